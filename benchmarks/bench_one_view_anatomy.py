"""Benchmark: one-view anatomy registration under a motion prior (issue 18), cervical phantom and real CT.

Each case imitates a blocked imager during treatment:

1. a stereo reference pair at a residual set-up pose after the couch correction (uniform +-0.5 mm / +-0.3 deg per
   axis), registered by the full stereo
   registration from perfect setup: the reference pose of the prior (``MotionPrior(reference)``, default
   diffusion and floor, no reference covariance);
2. the patient then moves, by motion drawn here and *not* from the prior's random-walk model: over ``dt``
   (uniform 0.5-6 s) a steady drift (random direction, 0-0.1 mm/s), in half the cases a sudden shift (random
   direction, 0.2-0.7 mm), and a rotation (random axis, 0-0.3 deg) about the isocentre;
3. only one view (A in even cases, B in odd ones) is rendered and registered with
   ``AnatomyRegistration.register_one_view(frame, imager, prior, dt)``.

Reported per set: 3D target error at the isocentre (the plan isocentre, at the target vertebra) p50 / p95, split
into in-plane (across the registered view's ray through the target) and out-of-plane (along it); the same for the
prior's mean alone (what one view adds); coverage of the reported uncertainty: the truth's target error inside
the 95 % ellipsoid of ``target_covariance_mm2(pose, pose_cov, target)`` (chi-square 3 dof <= 7.81), inside the 95 %
interval along the ray (1 dof) and across it (2 dof), and the deviation's 95 % upper bound
``|d| + sqrt(7.81 lambda_max)`` above the true deviation; time per one-view registration (wall and CPU, median /
p95); fraction accepted (``ok``). Errors and coverage are given over all cases and over the accepted ones.

Gantry-blocking schedules (``--schedules``, issue 18 item 3): a stereo reference, then one imager's frames alone at
1 Hz for 8 s while the other is blocked, the patient drifting (0-0.1 mm/s, 0-0.05 deg/s) and in half the schedules
shifting once; every frame against the same prior, ``elapsed_s`` growing. Reported as rows of their own.

Sets: the virtual room's cervical phantom (1024 x 1024 panels, i0 20000, default ``AnatomyConfig``, ROI target
+-1 level) and the real-CT validation CT (``datasets/realct/build.py``'s abdomen CT with TotalSegmentator labels,
fetched and cached by its ``fetch()``; frames by ``tracking.room.realct.CaseRenderer``, simple chain at i0 20000,
our projector, 150 mm of tissue past the CT's ends, levels cycled T12-L5 and rooms default / floor as
``build.py`` does).

Usage::

    python benchmarks/bench_one_view_anatomy.py [--phantom-cases N] [--realct-cases N] [--seed S] [--step-mm LO,HI]
        [--schedules K] [--blocked-s S] [--period-s S]

Times are wall (monotonic) and process CPU; the load average is printed, since other jobs share the machine.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import cv2
import numba
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "datasets" / "realct"))

from spineguide.calibration.geometry import default_stereo_geometry  # noqa: E402
from spineguide.registration.anatomy import AnatomyConfig, AnatomyRegistration, RegionOfInterest  # noqa: E402
from spineguide.registration.motion_prior import MotionPrior, target_covariance_mm2  # noqa: E402
from spineguide.registration.pose import Pose  # noqa: E402
from spineguide.tracking.room.kv import DetectorModel, KVSimulator  # noqa: E402
from spineguide.tracking.room.phantoms import cervical_phantom  # noqa: E402

I0 = 20000.0
CHI2_3_95 = 7.814727903251178
CHI2_2_95 = 5.991464547107979
Z_95 = 1.959963984540054
#: Gate tolerance of the summary's ENABLE column: ENABLE while ok and the deviation's 95 % bound is within it, mm.
GATE_TOLERANCE_MM = 1.0


def _unit(rng) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def draw_motion(rng, step_mm=(0.2, 0.7)) -> tuple[Pose, float]:
    """Patient motion since the stereo reference (room frame, about the isocentre) and the seconds it took."""
    dt = float(rng.uniform(0.5, 6.0))
    t = _unit(rng) * rng.uniform(0.0, 0.1) * dt
    if rng.uniform() < 0.5:
        t = t + _unit(rng) * rng.uniform(*step_mm)
    axis, angle = _unit(rng), rng.uniform(0.0, 0.3)
    from scipy.spatial.transform import Rotation

    r = Rotation.from_rotvec(axis * math.radians(angle)).as_matrix()
    return Pose(r, t), dt


def _timed(fn):
    w, c = time.monotonic(), time.process_time()
    out = fn()
    return out, time.monotonic() - w, time.process_time() - c


def one_case(reg: AnatomyRegistration, render, geometry, imager: str, rng, seed: int, step_mm) -> dict | None:
    """One blocked-view case; ``render(pose, seed)`` gives the raw stereo frames. None if the stereo reference was refused."""
    setup = Pose.from_six(rng.uniform(-0.5, 0.5, 3), rng.uniform(-0.3, 0.3, 3))
    motion, dt = draw_motion(rng, step_mm)
    stereo = reg.register(render(setup, seed), i0=I0)
    if not stereo.quality.ok:
        return None
    return measure(reg, render, geometry, imager, stereo.pose, setup, motion, dt, seed + 50_000)


def schedule_cases(reg: AnatomyRegistration, render, geometry, imager: str, rng, seed: int, step_mm,
                   blocked_s: float, period_s: float) -> list[dict] | None:
    """A gantry-blocking schedule: a stereo reference, then ``imager``'s view alone every ``period_s`` for
    ``blocked_s`` seconds (the other imager blocked by the gantry) while the patient drifts (0-0.1 mm/s, 0-0.05
    deg/s, random directions) and, in half the sequences, shifts once (``step_mm``) at a random moment. Every frame
    is registered against the same prior (no stereo pair in between), ``elapsed_s`` growing."""
    setup = Pose.from_six(rng.uniform(-0.5, 0.5, 3), rng.uniform(-0.3, 0.3, 3))
    stereo = reg.register(render(setup, seed), i0=I0)
    if not stereo.quality.ok:
        return None
    velocity = _unit(rng) * rng.uniform(0.0, 0.1)
    axis, rate = _unit(rng), rng.uniform(0.0, 0.05)
    step = _unit(rng) * rng.uniform(*step_mm) if rng.uniform() < 0.5 else np.zeros(3)
    step_at_s = rng.uniform(0.0, blocked_s)
    from scipy.spatial.transform import Rotation

    rows = []
    for k, t in enumerate(np.arange(period_s, blocked_s + 1e-9, period_s)):
        shift = velocity * t + (step if t >= step_at_s else 0.0)
        motion = Pose(Rotation.from_rotvec(axis * math.radians(rate * t)).as_matrix(), shift)
        rows.append(measure(reg, render, geometry, imager, stereo.pose, setup, motion, float(t), seed + 1000 * (k + 1)))
    return rows


def _service_prior(floor_mm: float, floor_deg: float, reference_sigma_mm: float, reference_sigma_deg: float):
    """The prior the service builds (``[one_view]``) around a reference pose, without a stereo history."""
    from spineguide.tracking.service.config import OneViewConfig

    ov = OneViewConfig(floor_mm=floor_mm, floor_deg=floor_deg, reference_sigma_mm=reference_sigma_mm,
                       reference_sigma_deg=reference_sigma_deg)
    return lambda reference: MotionPrior(reference, ov.reference_cov(), ov.prior_diffusion(), ov.prior_floor())


#: The prior each one-view registration leans on (set by main from the options; the service's defaults).
PRIOR = _service_prior(0.05, 0.05, 0.1, 0.1)


def measure(reg: AnatomyRegistration, render, geometry, imager: str, reference: Pose, setup: Pose, motion: Pose,
            dt: float, seed: int) -> dict:
    """Render the patient at ``motion`` on top of ``setup``, register ``imager``'s view against the prior at
    ``reference`` ``dt`` seconds on, and score it."""
    truth = motion.compose(setup)
    frame = render(truth, seed)[imager]
    prior = PRIOR(reference)
    res, wall, cpu = _timed(lambda: reg.register_one_view(frame, imager, prior, dt, i0=I0))
    target = np.zeros(3)  # the plan isocentre, room frame at perfect setup
    true_dev = truth.apply(target)
    err = res.pose.apply(target) - true_dev
    prior_err = reference.apply(target) - true_dev
    ray = true_dev - geometry[imager].source_mm
    ray = ray / np.linalg.norm(ray)
    basis = np.linalg.svd(ray[None, :])[2][1:]  # (2, 3): across the ray
    cov3 = target_covariance_mm2(res.pose, res.pose_cov, target)
    maha3 = float(err @ np.linalg.solve(cov3, err))
    cin = basis @ cov3 @ basis.T
    ein = basis @ err
    maha_in = float(ein @ np.linalg.solve(cin, ein))
    z_out = float(err @ ray) / math.sqrt(float(ray @ cov3 @ ray))
    dev_est = float(np.linalg.norm(res.pose.apply(target)))
    bound = dev_est + math.sqrt(CHI2_3_95 * float(np.linalg.eigvalsh(cov3).max()))
    return {
        "imager": imager, "ok": res.ok, "reason": res.reason or "ok", "dt": dt, "wall_ms": 1000 * wall, "cpu_ms": 1000 * cpu,
        "err": float(np.linalg.norm(err)), "err_in": float(np.linalg.norm(ein)), "err_out": abs(float(err @ ray)),
        "prior_err": float(np.linalg.norm(prior_err)), "prior_in": float(np.linalg.norm(basis @ prior_err)),
        "prior_out": abs(float(prior_err @ ray)), "motion_mm": float(np.linalg.norm(motion.translation_mm)),
        "cover3": maha3 <= CHI2_3_95, "cover_in": maha_in <= CHI2_2_95, "cover_out": abs(z_out) <= Z_95,
        "cover_bound": float(np.linalg.norm(true_dev)) <= bound, "bound": bound,
        "enable": res.ok and bound <= GATE_TOLERANCE_MM, "true_dev": float(np.linalg.norm(true_dev)),
        "std_in": res.target_std_in_plane_mm, "std_out": res.target_std_out_of_plane_mm,
        "stereo_err": float(np.linalg.norm(reference.apply(target) - setup.apply(target))),
        "iterations": res.iterations, "drrs": res.drr_evaluations,
    }


def _p(a, q):
    return float(np.percentile(a, q)) if len(a) else math.nan


def summary_rows(name: str, rows: list[dict], refused_stereo: int) -> list[str]:
    out = []
    for subset, sel in (("all", rows), ("accepted", [r for r in rows if r["ok"]])):
        if not sel:
            out.append(f"| {name} | {subset} | 0 | - | - | - | - | - | - | - | - | - | - |")
            continue
        g = lambda k: np.array([r[k] for r in sel], dtype=float)  # noqa: E731
        out.append(
            f"| {name} | {subset} | {len(sel)} | {_p(g('err'), 50):.3f} / {_p(g('err'), 95):.3f} | "
            f"{_p(g('err_in'), 50):.3f} / {_p(g('err_in'), 95):.3f} | {_p(g('err_out'), 50):.3f} / {_p(g('err_out'), 95):.3f} | "
            f"{_p(g('prior_err'), 50):.3f} / {_p(g('prior_err'), 95):.3f} (in {_p(g('prior_in'), 95):.3f}) | "
            f"{100 * g('cover3').mean():.0f}% / {100 * g('cover_in').mean():.0f}% / {100 * g('cover_out').mean():.0f}% / "
            f"{100 * g('cover_bound').mean():.0f}% | {_p(g('std_in'), 50):.3f} / {_p(g('std_out'), 50):.3f} | "
            f"{_p(g('wall_ms'), 50):.0f} / {_p(g('wall_ms'), 95):.0f} ({_p(g('cpu_ms'), 50):.0f} / {_p(g('cpu_ms'), 95):.0f}) | "
            f"{100 * np.mean([r['ok'] for r in rows]):.0f}% | {100 * g('enable').mean():.0f}% / "
            f"{int(np.sum(g('enable').astype(bool) & (g('true_dev') > GATE_TOLERANCE_MM)))} |"
            + (f" {refused_stereo} stereo refs refused |" if subset == "all" else " |")
        )
    return out


def run_phantom(n: int, seed: int, config: AnatomyConfig, step_mm, schedule) -> tuple[list[dict], int, dict]:
    t0 = time.monotonic()
    phantom = cervical_phantom()
    geometry = default_stereo_geometry()
    sim = KVSimulator(phantom, geometry, detector=DetectorModel(i0=I0))
    roi = RegionOfInterest.from_labels(phantom.planning_ct, phantom.labels, phantom.target_label, neighbours=1)
    reg = AnatomyRegistration(phantom.planning_ct, phantom.isocentre_lps_mm, geometry, roi, config)
    build_s = time.monotonic() - t0

    def render(pose, s):
        return dict(sim.render(pose, seed=s).frames)

    tw = time.monotonic()
    warm = render(Pose.identity(), 999)
    reg.register_one_view(warm["A"], "A", MotionPrior(Pose.identity()), 1.0, i0=I0)
    warm_s = time.monotonic() - tw
    rng = np.random.default_rng(seed)
    rows, refused = [], 0
    for case in range(n):
        r = one_case(reg, render, geometry, "AB"[case % 2], rng, case, step_mm)
        if r is None:
            refused += 1
            continue
        rows.append(r)
        _print_case("cervical", case, r)
    seq_rows, seq_refused = [], 0
    for k in range(schedule[0]):
        out = schedule_cases(reg, render, geometry, "BA"[k % 2], rng, 700 + k, step_mm, schedule[1], schedule[2])
        if out is None:
            seq_refused += 1
            continue
        for j, r in enumerate(out):
            _print_case(f"cervical schedule {k}", j, r)
        seq_rows += out
    return rows, refused, {"build_s": build_s, "warm_s": warm_s, "schedule": (seq_rows, seq_refused)}


def run_realct(n: int, seed: int, config: AnatomyConfig, step_mm, schedule) -> tuple[list[dict], int, dict]:
    import build  # datasets/realct/build.py: the pinned download and the rooms

    from spineguide.tracking.room.realct import CaseRenderer, read_labelled_ct

    t0 = time.monotonic()
    files = build.fetch()
    labelled = read_labelled_ct(files["ct"], files["labels"], "totalsegmentator", "HFS")
    geometries = build.rooms(["default", "floor"])
    renderer = CaseRenderer(labelled, geometries, detector=DetectorModel(i0=I0), beyond_ends_mm=150.0)
    levels = build.DEFAULT_LEVELS.split(",")
    regs: dict[tuple[str, str], AnatomyRegistration] = {}
    build_s = time.monotonic() - t0
    rng = np.random.default_rng(seed)
    rows, refused = [], 0

    def registration(level, room):
        if (level, room) not in regs:
            roi = RegionOfInterest.from_labels(labelled.ct, labelled.labels, labelled.label_of(level), neighbours=1)
            regs[(level, room)] = AnatomyRegistration(labelled.ct, renderer.isocentre_lps_mm(level), geometries[room],
                                                      roi, config)
        return regs[(level, room)]

    tw = time.monotonic()
    warm = renderer.frames(levels[0], "default", Pose.identity(), "own", 999)
    registration(levels[0], "default").register_one_view(warm["A"], "A", MotionPrior(Pose.identity()), 1.0, i0=I0)
    warm_s = time.monotonic() - tw
    for case in range(n):
        level, room = levels[case % len(levels)], ("default", "floor")[(case // len(levels)) % 2]
        reg = registration(level, room)

        def render(pose, s, level=level, room=room):
            return renderer.frames(level, room, pose, "own", s)

        r = one_case(reg, render, geometries[room], "AB"[case % 2], rng, case, step_mm)
        if r is None:
            refused += 1
            continue
        r["level"], r["room"] = level, room
        rows.append(r)
        _print_case(f"realct {level} {room}", case, r)
    seq_rows, seq_refused = [], 0
    for k in range(schedule[0]):
        level, room = levels[(k + 1) % len(levels)], ("default", "floor")[k % 2]
        reg = registration(level, room)

        def render(pose, s, level=level, room=room):
            return renderer.frames(level, room, pose, "own", s)

        out = schedule_cases(reg, render, geometries[room], "BA"[k % 2], rng, 700 + k, step_mm, schedule[1],
                             schedule[2])
        if out is None:
            seq_refused += 1
            continue
        for j, r in enumerate(out):
            _print_case(f"realct schedule {k} {level} {room}", j, r)
        seq_rows += out
    renderer.close()
    return rows, refused, {"build_s": build_s, "warm_s": warm_s, "schedule": (seq_rows, seq_refused)}


def _print_case(name, case, r):
    print(f"  {name} case {case:3d} view {r['imager']}: true deviation {r['true_dev']:.2f} mm, dt {r['dt']:.1f} s motion {r['motion_mm']:.2f} mm | err {r['err']:.3f} "
          f"(in {r['err_in']:.3f} out {r['err_out']:.3f}) prior-only {r['prior_err']:.3f} | std in {r['std_in']:.3f} "
          f"out {r['std_out']:.3f} | cover3 {r['cover3']} bound {r['bound']:.2f} | {r['wall_ms']:.0f} ms "
          f"(cpu {r['cpu_ms']:.0f}, {r['iterations']} its, {r['drrs']} DRRs) {r['reason']} enable {r['enable']} | stereo ref err {r['stereo_err']:.3f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantom-cases", type=int, default=24)
    parser.add_argument("--realct-cases", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1818)
    parser.add_argument("--step-mm", default="0.2,0.7", metavar="LO,HI",
                        help="size range of the sudden shift drawn in half the cases, mm (default 0.2,0.7)")
    parser.add_argument("--schedules", type=int, default=4,
                        help="gantry-blocking schedules per set: one view alone for --blocked-s seconds (default 4)")
    parser.add_argument("--blocked-s", type=float, default=8.0, help="length of each blocked window, s (default 8)")
    parser.add_argument("--period-s", type=float, default=1.0, help="one-view frame period in a blocked window, s")
    parser.add_argument("--floor-mm", type=float, default=0.05, help="prior floor per translation axis (the service's "
                        "[one_view] default; 0.3 is MotionPrior's own default)")
    parser.add_argument("--floor-deg", type=float, default=0.05, help="prior floor per rotation axis")
    parser.add_argument("--reference-sigma-mm", type=float, default=0.1, help="the stereo reference's own sigma, mm")
    parser.add_argument("--reference-sigma-deg", type=float, default=0.1, help="the stereo reference's own sigma, deg")
    args = parser.parse_args(argv)
    global PRIOR
    PRIOR = _service_prior(args.floor_mm, args.floor_deg, args.reference_sigma_mm, args.reference_sigma_deg)
    print(f"# prior: floor {args.floor_mm} mm / {args.floor_deg} deg, reference sigma {args.reference_sigma_mm} mm / "
          f"{args.reference_sigma_deg} deg, the service's drift; widened by the in-plane move seen")
    step_mm = tuple(float(v) for v in args.step_mm.split(","))
    schedule = (args.schedules, args.blocked_s, args.period_s)
    config = AnatomyConfig()
    print(f"# bench_one_view_anatomy: {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, numba {numba.__version__} "
          f"({numba.get_num_threads()} threads), numpy {np.__version__}, opencv {cv2.__version__}, "
          f"python {platform.python_version()}")
    print(f"# one-view config: levels {[(lv.volume_factor, lv.binning, lv.max_iterations) for lv in config.one_view_levels]}, "
          f"background {config.tracking_background_derivatives}, max prior chi2 {config.one_view_max_prior_chi2}, "
          f"correlation lag {config.one_view_correlation_lag_px} px")
    load_start = os.getloadavg()
    sets = []
    if args.phantom_cases or args.schedules:
        sets.append(("cervical phantom", *run_phantom(args.phantom_cases, args.seed, config, step_mm, schedule)))
    if args.realct_cases or args.schedules:
        sets.append(("real CT abdomen", *run_realct(args.realct_cases, args.seed + 1, config, step_mm, schedule)))
    print()
    print("| set | cases | n | target err p50 / p95 mm | in-plane p50 / p95 mm | out-of-plane p50 / p95 mm "
          "| prior mean alone p50 / p95 mm | coverage: 95% ellipsoid / in-plane / out-of-plane / bound | "
          "reported std in / out mm (median) | time median / p95 ms (CPU median / p95) | accepted (all cases) "
          f"| gate at {GATE_TOLERANCE_MM:g} mm: ENABLE / wrongly (true deviation > tolerance) | |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, rows, refused, info in sets:
        if rows or refused:
            for line in summary_rows(name, rows, refused):
                print(line)
        seq_rows, seq_refused = info["schedule"]
        if seq_rows or seq_refused:
            for line in summary_rows(f"{name}, blocking schedules ({args.schedules} x {args.blocked_s:g} s)", seq_rows,
                                     seq_refused):
                print(line)
    for name, rows, refused, info in sets:
        reasons = sorted({r["reason"] for r in rows + info["schedule"][0]})
        print(f"# {name}: setup {info['build_s']:.1f} s, first one-view registration (incl. numba load) "
              f"{info['warm_s']:.2f} s, reasons seen {reasons}")
    print(f"# load average at start {load_start[0]:.2f} / end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
