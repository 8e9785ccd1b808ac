"""Benchmark: stereo anatomy (DRR) 2D/3D registration on the virtual room's phantoms (issue 4).

For each phantom, N seeded cases: patient pose with start errors uniform in
+-10 mm and +-4 degrees per axis, frames simulated from the phantom's truth grid
at i0 = 20000 (Poisson noise, detector blur), registration started at perfect
setup. mTRE is the mean 3D error over the target vertebra's voxels
(planning-CT label), room frame. Tracking mode: from each result, the patient
moves again by up to 2 mm / 1 degree (per-axis uniform, scaled so the vector
stays within 2 mm / 1 degree); the new pair is registered from the previous
result.

Peer, side by side on the first ``--peer-cases`` cases of each phantom (the same
frames): ITK's two-projection 2D/3D registration (PyPI
``itk-twoprojectionregistration``: TwoProjectionImageRegistrationMethod,
SiddonJacobsRayCastInterpolateImageFunction, NormalizedCorrelationTwoImageToOneImageMetric,
PowellOptimizer), set up as :class:`ItkTwoProjectionPeer` describes.

Usage::

    python benchmarks/bench_anatomy.py [--cases N] [--peer-cases K] [--quick] [--phantom thoracolumbar|cervical|both]

``--quick``: 5 cases per phantom, 1 peer case. Times are wall (monotonic) and
process CPU (all threads); the machine's load average is printed, since other
jobs share it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import math
import os
import platform
import sys
import time

import cv2
import numba
import numpy as np

from spineguide.calibration.geometry import default_stereo_geometry
from spineguide.registration.anatomy import AnatomyConfig, AnatomyRegistration, PyramidLevel, RegionOfInterest
from spineguide.registration.pose import Pose
from spineguide.registration.similarity import line_integrals
from spineguide.tracking.room.kv import DetectorModel, KVSimulator
from spineguide.tracking.room.phantoms import cervical_phantom, thoracolumbar_phantom

I0 = 20000.0
SUCCESS_MM = 1.0


_HFS_ROOM_FROM_LPS = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # CONVENTIONS, HFS


def _rz(a):
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class ItkTwoProjectionPeer:
    """ITK's TwoProjectionImageRegistrationMethod + SiddonJacobsRayCastInterpolateImageFunction + Powell + NCC.

    Geometry mapped exactly: each view's projection angle about the CT z axis and the source-to-
    isocentre distance come from our imager; ITK's fixed image is our log frame resampled onto its
    camera grid (pixels at the isocentre plane); the ray caster puts voxel i at [i s, (i+1) s] from the
    volume corner, so the isocentre and transform centre are (index + 0.5) * spacing of the plan
    isocentre. Fixed images cover the projected ROI (+4 mm), two-level pyramid, Powell tolerances
    tighter than ITK's example.
    """

    def __init__(self, ct, isocentre_lps_mm, geometry, roi_mask):
        import itk

        self.itk = itk
        if ct.patient_position.name != "HFS" or not np.allclose(ct.direction, np.eye(3)):
            raise ValueError("peer set-up supports axial HFS CTs only")
        self.geometry = geometry
        self.iso_lps = np.asarray(isocentre_lps_mm, dtype=float)
        sp = np.asarray(ct.spacing_mm, dtype=float)  # (x, y, z) = (i, j, k)
        kji = np.argwhere(roi_mask)
        # The whole CT, HU + 1000 (about proportional to attenuation), threshold 0: the DRR then
        # holds everything the radiograph holds, which NCC on intensities needs (a bone-only
        # or cropped DRR put NCC's optimum 0.3 mm / 0.5 deg off the truth in our trials).
        lo = np.zeros(3, dtype=int)
        sub = ct.hu.astype(np.float32) + 1000.0
        self.threshold = 0.0
        iso_index = (self.iso_lps - np.asarray(ct.origin_lps_mm)) / sp
        self.levels = []
        for factor in (2, 1):
            if factor > 1:
                nk, nj, ni = (s // factor for s in sub.shape)
                vol = sub[: nk * factor, : nj * factor, : ni * factor].reshape(nk, factor, nj, factor, ni, factor).mean(axis=(1, 3, 5))
            else:
                vol = sub
            # Ray caster: voxel i spans [i s, (i+1) s] from the corner whatever the origin says.
            iso_world = (iso_index - lo + 0.5) * sp  # true for factor 1; block means keep the corner and the extent
            img = itk.image_from_array(np.ascontiguousarray(vol, dtype=np.float32))
            img.SetSpacing([float(v) for v in sp * factor])
            img.SetOrigin([0.0, 0.0, 0.0])
            self.levels.append((factor, img, iso_world))
        # ROI corners, LPS offsets from the isocentre, for the fixed-image extent.
        ijk = kji[:, ::-1]
        mn, mx = ijk.min(axis=0) - 0.5, ijk.max(axis=0) + 0.5
        corners = np.array([[a, b, c] for a in (mn[0], mx[0]) for b in (mn[1], mx[1]) for c in (mn[2], mx[2])])
        self.roi_corners_lps = corners * sp + np.asarray(ct.origin_lps_mm) - self.iso_lps
        self.views = []
        for im in geometry.imagers:
            src_lps = _HFS_ROOM_FROM_LPS.T @ im.source_mm
            if abs(src_lps[2]) > 1e-6 * np.linalg.norm(src_lps):
                raise ValueError(f"imager '{im.name}': source not in the axial plane of the isocentre")
            angle = math.atan2(src_lps[0], -src_lps[1])
            self.views.append((im, angle, float(np.linalg.norm(src_lps))))

    def _fixed(self, log_image, im, angle, scd, spacing_mm):
        """Our line-integral frame resampled onto ITK's camera grid (isocentre plane) over the projected ROI."""
        rot_t = _rz(angle).T
        cam = np.array([(rot_t @ c)[[0, 2]] for c in self.roi_corners_lps])  # (cam x, cam y) at the iso plane
        # Perspective: scale the corners' in-plane offsets to the isocentre plane.
        depth = np.array([scd + (rot_t @ c)[1] for c in self.roi_corners_lps])
        cam = cam * (scd / depth)[:, None]
        margin = 4.0
        lo = cam.min(axis=0) - margin
        hi = cam.max(axis=0) + margin
        n = np.ceil((hi - lo) / spacing_mm).astype(int) + 1
        cx = lo[0] + spacing_mm * np.arange(n[0])
        cy = lo[1] + spacing_mm * np.arange(n[1])
        gx, gy = np.meshgrid(cx, cy)  # [j, i]
        lps = np.stack([gx, np.zeros_like(gx), gy], axis=-1) @ _rz(angle).T
        room = lps @ _HFS_ROOM_FROM_LPS.T
        px = im.project(room.reshape(-1, 3)).reshape(gx.shape + (2,)).astype(np.float32)
        # Pixel footprint: average the panel over the ITK pixel before sampling (no aliasing).
        panel_px = spacing_mm * im.magnification / float(np.mean(im.pixel_spacing_mm))
        src = log_image.astype(np.float32)
        if panel_px > 1.5:
            src = cv2.blur(src, (int(round(panel_px)), int(round(panel_px))))
        fixed = cv2.remap(src, px[..., 0], px[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        itk = self.itk
        img = itk.image_from_array(np.ascontiguousarray(fixed[None], dtype=np.float32))
        img.SetSpacing([float(spacing_mm), float(spacing_mm), 1.0])
        img.SetOrigin([float(lo[0]), float(lo[1]), -float(scd)])
        return img

    def register(self, logs):
        """Pose (room frame) from line-integral frames, starting at identity; returns (pose, seconds, evaluations)."""
        itk = self.itk
        t0 = time.monotonic()
        image_type = itk.Image[itk.F, 3]
        params = None
        evaluations = 0
        pix_iso = float(np.mean(self.views[0][0].pixel_spacing_mm)) / self.views[0][0].magnification
        for (factor, moving, iso_world), (fixed_bin, step_length) in zip(self.levels, ((4, 4.0), (2, 1.0))):
            metric = itk.NormalizedCorrelationTwoImageToOneImageMetric[image_type, image_type].New()
            metric.SetComputeGradient(False)
            metric.SetSubtractMean(True)
            transform = itk.Euler3DTransform[itk.D].New()
            transform.SetComputeZYX(True)
            transform.SetCenter([float(v) for v in iso_world])
            if params is not None:
                transform.SetParameters(params)
            optimizer = itk.PowellOptimizer.New()
            optimizer.SetMaximize(False)
            optimizer.SetMaximumIteration(20)
            optimizer.SetMaximumLineIteration(10)
            optimizer.SetStepLength(step_length)
            optimizer.SetStepTolerance(0.01)
            optimizer.SetValueTolerance(1e-5)
            scales = itk.OptimizerParameters[itk.D](6)
            for k in range(3):
                scales[k] = 180.0 / math.pi  # one degree weighs as one millimetre
                scales[k + 3] = 1.0
            optimizer.SetScales(scales)
            reg = itk.TwoProjectionImageRegistrationMethod[image_type, image_type].New()
            reg.SetMetric(metric)
            reg.SetOptimizer(optimizer)
            reg.SetTransform(transform)
            fixed = []
            interps = []
            for im, angle, scd in self.views:
                f = self._fixed(logs[im.name], im, angle, scd, fixed_bin * pix_iso)
                fixed.append(f)
                interp = itk.SiddonJacobsRayCastInterpolateImageFunction[image_type, itk.D].New()
                interp.SetProjectionAngle(angle)
                interp.SetFocalPointToIsocenterDistance(scd)
                interp.SetThreshold(self.threshold)
                interp.SetTransform(transform)
                interp.Initialize()
                interps.append(interp)
            reg.SetFixedImage1(fixed[0])
            reg.SetFixedImage2(fixed[1])
            reg.SetFixedImageRegion1(fixed[0].GetBufferedRegion())
            reg.SetFixedImageRegion2(fixed[1].GetBufferedRegion())
            reg.SetMovingImage(moving)
            reg.SetInterpolator1(interps[0])
            reg.SetInterpolator2(interps[1])
            reg.SetInitialTransformParameters(transform.GetParameters())
            reg.Update()
            last = reg.GetLastTransformParameters()
            params = itk.OptimizerParameters[itk.D](6)
            for k in range(6):
                params[k] = last[k]
            evaluations += optimizer.GetCurrentIteration()
        transform = itk.Euler3DTransform[itk.D].New()
        transform.SetComputeZYX(True)
        transform.SetCenter([float(v) for v in self.levels[-1][2]])
        transform.SetParameters(params)
        matrix = transform.GetMatrix()
        r_lps = np.array([[matrix(i, j) for j in range(3)] for i in range(3)])
        t_lps = np.array([params[3], params[4], params[5]])
        m = _HFS_ROOM_FROM_LPS
        pose = Pose(m @ r_lps @ m.T, m @ t_lps)
        return pose, time.monotonic() - t0, evaluations


def _target_points_room(phantom) -> np.ndarray:
    ct = phantom.planning_ct
    idx = np.argwhere(phantom.labels == phantom.target_label)[:, ::-1].astype(float)
    return ct.lps_to_room(ct.index_to_lps(idx), phantom.isocentre_lps_mm)


def _mtre(pose: Pose, truth: Pose, pts: np.ndarray) -> float:
    return float(np.mean(np.linalg.norm(pose.apply(pts) - truth.apply(pts), axis=1)))


def _timed(fn):
    w, c = time.monotonic(), time.process_time()
    out = fn()
    return out, time.monotonic() - w, time.process_time() - c


def run_phantom(name: str, n_cases: int, n_peer: int, seed: int, slice_mm: float | None = None,
                neighbours: int = 0, config: AnatomyConfig | None = None) -> dict:
    planning = {} if slice_mm is None else {"planning_spacing_mm": (0.9766, 0.9766, slice_mm)}
    build = {"thoracolumbar": lambda: thoracolumbar_phantom(with_seeds=False, **planning),
             "cervical": lambda: cervical_phantom(**planning)}[name]
    t0 = time.monotonic()
    phantom = build()
    geometry = default_stereo_geometry()
    simulator = KVSimulator(phantom, geometry, detector=DetectorModel(i0=I0))
    roi = RegionOfInterest.from_labels(phantom.planning_ct, phantom.labels, phantom.target_label, neighbours=neighbours)
    t1 = time.monotonic()
    reg = AnatomyRegistration(phantom.planning_ct, phantom.isocentre_lps_mm, geometry, roi, config or AnatomyConfig())
    prep_s = time.monotonic() - t1
    peer = None
    if n_peer:
        try:
            peer = ItkTwoProjectionPeer(phantom.planning_ct, phantom.isocentre_lps_mm, geometry, roi.mask)
        except ImportError as err:
            print(f"# peer not available: {err}")
    pts = _target_points_room(phantom)
    rng = np.random.default_rng(seed)
    # Warm-up: numba compilation (cached on disk after the first run) reported on its own.
    tw = time.monotonic()
    reg.register(dict(simulator.render(Pose.identity(), seed=999).frames), i0=I0)
    warm_s = time.monotonic() - tw
    load_start = os.getloadavg()
    rows, peer_rows = [], []
    for case in range(n_cases):
        truth = Pose.from_six(rng.uniform(-10, 10, 3), rng.uniform(-4, 4, 3))
        motion = Pose.from_six(rng.uniform(-2, 2, 3) / math.sqrt(3), rng.uniform(-1, 1, 3) / math.sqrt(3))
        frames = dict(simulator.render(truth, seed=case).frames)
        res, wall, cpu = _timed(lambda: reg.register(frames, i0=I0))
        moved = motion.compose(truth)
        frames2 = dict(simulator.render(moved, seed=10_000 + case).frames)
        trk, twall, tcpu = _timed(
            lambda: reg.register(frames2, i0=I0, initial_pose=res.pose, tracking=True)
        )
        r = (
            _mtre(res.pose, truth, pts), res.pose.compose(truth.inverse()).angle_deg(), wall, cpu,
            res.quality.ok, res.quality.reason.value, _mtre(trk.pose, moved, pts),
            trk.pose.compose(moved.inverse()).angle_deg(), twall, tcpu, trk.quality.ok, trk.quality.reason.value,
        )
        rows.append(r)
        line = (f"  {name} case {case:3d}: mTRE {r[0]:.3f} mm rot {r[1]:.3f} deg {1000 * r[2]:.0f} ms "
                f"(cpu {1000 * r[3]:.0f}) {r[5]:>15s} | tracking mTRE {r[6]:.3f} mm rot {r[7]:.3f} deg "
                f"{1000 * r[8]:.0f} ms (cpu {1000 * r[9]:.0f}) {r[11]}")
        if peer is not None and case < n_peer:
            logs = {k: line_integrals(np.asarray(v), I0, k) for k, v in frames.items()}
            (ppose, _, _), pwall, pcpu = _timed(lambda: peer.register(logs))
            pr = (_mtre(ppose, truth, pts), ppose.compose(truth.inverse()).angle_deg(), pwall, pcpu, r[0], r[1], r[2])
            peer_rows.append(pr)
            line += f" || ITK peer mTRE {pr[0]:.3f} mm rot {pr[1]:.3f} deg {pr[2]:.1f} s (cpu {pr[3]:.1f} s)"
        print(line, flush=True)
    a = np.array([[r[0], r[1], r[2], r[3], r[6], r[7], r[8], r[9]] for r in rows])
    ok = np.array([r[4] for r in rows])
    out = {
        "phantom": name, "cases": n_cases, "build_s": t1 - t0, "prep_s": prep_s, "warm_s": warm_s,
        "success": float(np.mean(a[:, 0] < SUCCESS_MM)), "median_mtre": float(np.median(a[:, 0])),
        "p95_mtre": float(np.percentile(a[:, 0], 95)),
        "rot_med": float(np.median(a[:, 1])), "rot_p95": float(np.percentile(a[:, 1], 95)),
        "time_med_ms": 1000 * float(np.median(a[:, 2])), "time_p95_ms": 1000 * float(np.percentile(a[:, 2], 95)),
        "cpu_med_ms": 1000 * float(np.median(a[:, 3])), "ok_rate": float(np.mean(ok)),
        "ok_success": float(np.mean(a[ok, 0] < SUCCESS_MM)) if np.any(ok) else math.nan,
        "failed_but_ok": int(np.sum(ok & (a[:, 0] >= SUCCESS_MM))),
        "trk_success": float(np.mean(a[:, 4] < SUCCESS_MM)), "trk_median_mtre": float(np.median(a[:, 4])),
        "trk_rot_p95": float(np.percentile(a[:, 5], 95)), "trk_time_med_ms": 1000 * float(np.median(a[:, 6])),
        "trk_cpu_med_ms": 1000 * float(np.median(a[:, 7])), "trk_ok_rate": float(np.mean([r[10] for r in rows])),
        "reasons": sorted({r[5] for r in rows}), "trk_reasons": sorted({r[11] for r in rows}), "load_start": load_start, "load_end": os.getloadavg(),
        "peer": peer_rows,
    }
    return out


def override_config(config: AnatomyConfig, items: list[str]) -> AnatomyConfig:
    """``NAME=VALUE`` overrides of an AnatomyConfig's number fields (benchmark experiments)."""
    for item in items:
        name, _, value = item.partition("=")
        current = getattr(config, name, None)
        if not name or current is None or isinstance(current, (tuple, str)):
            raise ValueError(f"--set-config: no settable AnatomyConfig number field {name!r}")
        try:
            if isinstance(current, bool):
                if value.lower() not in ("0", "1", "true", "false"):
                    raise ValueError(f"{name} takes 0/1/true/false, got {value!r}")
                parsed = value.lower() in ("1", "true")
            else:
                parsed = type(current)(value)
            config = replace(config, **{name: parsed})
        except (TypeError, ValueError) as err:
            raise ValueError(f"--set-config {item!r}: {err}") from err
    return config


def parse_levels(text: str) -> tuple[PyramidLevel, ...]:
    """``F,B,S,N[,c];...`` (volume factor, binning, smoothing px, iterations, 'c' for a context level) -> levels."""
    out = []
    for part in text.split(";"):
        f = part.split(",")
        out.append(PyramidLevel(int(f[0]), int(f[1]), float(f[2]), int(f[3]), context=len(f) > 4 and f[4] == "c"))
    return tuple(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--peer-cases", type=int, default=5, help="cases (the first K) also run through the ITK peer")
    parser.add_argument("--quick", action="store_true", help="5 cases per phantom, 1 peer case")
    parser.add_argument("--phantom", choices=("thoracolumbar", "cervical", "both"), default="both")
    parser.add_argument("--seed", type=int, default=20240)
    parser.add_argument("--planning-slice-mm", type=float, default=None,
                        help="slice thickness of the planning CT (default: the phantoms' own, 2 mm)")
    parser.add_argument("--roi-neighbours", type=int, choices=(0, 1), default=1,
                        help="ROI = target vertebra (0) or target +-1 level (1); mTRE is always over the target")
    parser.add_argument("--projector", choices=("siddon", "joseph"), default=AnatomyConfig().projector,
                        help="line-integral model of the ROI DRRs (default: the AnatomyConfig default)")
    parser.add_argument("--jacobian", choices=("central", "analytic"), default=AnatomyConfig().jacobian,
                        help="pose derivatives of the ROI DRRs (default: the AnatomyConfig default)")
    parser.add_argument("--background-derivatives", choices=("flow", "difference", "exact"),
                        default=AnatomyConfig().background_derivatives,
                        help="background model's pose derivatives in the full registration (default: the AnatomyConfig default)")
    parser.add_argument("--set-config", action="append", default=[], metavar="NAME=VALUE",
                        help="override an AnatomyConfig number (e.g. background_subsample=2); repeatable")
    parser.add_argument("--tracking-levels", default=None, metavar="F,B,S,N;...", help="tracking-mode pyramid")
    args = parser.parse_args(argv)
    config = AnatomyConfig(projector=args.projector, jacobian=args.jacobian,
                           background_derivatives=args.background_derivatives,
                           tracking_background_derivatives=args.background_derivatives)
    if args.tracking_levels:
        config = replace(config, tracking_levels=parse_levels(args.tracking_levels))
    try:
        config = override_config(config, args.set_config)
    except ValueError as err:
        parser.error(str(err))
    n = 5 if args.quick else args.cases
    n_peer = min(1 if args.quick else args.peer_cases, n)
    print(f"# bench_anatomy: {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, "
          f"numba {numba.__version__} ({numba.get_num_threads()} threads), numpy {np.__version__}, "
          f"opencv {cv2.__version__}, python {platform.python_version()}")
    try:
        import itk

        print(f"# peer: itk {itk.Version.GetITKVersion()} + itk-twoprojectionregistration")
    except ImportError:
        print("# peer: itk-twoprojectionregistration not installed")
    names = ("thoracolumbar", "cervical") if args.phantom == "both" else (args.phantom,)
    print(f"# anatomy config: projector {config.projector}, jacobian {config.jacobian}, "
          f"background derivatives {config.background_derivatives} (tracking {config.tracking_background_derivatives})"
          f"{', overrides ' + ' '.join(args.set_config) if args.set_config else ''}")
    results = [run_phantom(nm, n, n_peer, args.seed, args.planning_slice_mm, args.roi_neighbours, config) for nm in names]
    print()
    print("| phantom | cases | success (mTRE<1mm) | median mTRE mm | p95 mTRE mm | rot err median / p95 deg "
          "| time median / p95 ms | CPU median ms | quality.ok | tracking success | tracking median mTRE mm "
          "| tracking rot p95 deg | tracking time median ms (CPU) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['phantom']} | {r['cases']} | {100 * r['success']:.0f}% | {r['median_mtre']:.3f} | "
              f"{r['p95_mtre']:.3f} | {r['rot_med']:.2f} / {r['rot_p95']:.2f} | {r['time_med_ms']:.0f} / "
              f"{r['time_p95_ms']:.0f} | {r['cpu_med_ms']:.0f} | {100 * r['ok_rate']:.0f}% | "
              f"{100 * r['trk_success']:.0f}% | {r['trk_median_mtre']:.3f} | {r['trk_rot_p95']:.2f} | "
              f"{r['trk_time_med_ms']:.0f} ({r['trk_cpu_med_ms']:.0f}) |")
    print()
    print("| phantom | peer cases | ours: median mTRE mm / max rot deg / median time s | "
          "ITK peer: median mTRE mm / max rot deg / median time s (CPU s) | speed-up (median wall) |")
    print("|---|---|---|---|---|")
    for r in results:
        p = np.array(r["peer"]) if r["peer"] else None
        if p is None:
            print(f"| {r['phantom']} | 0 | - | not run | - |")
            continue
        print(f"| {r['phantom']} | {len(p)} (cases 0-{len(p) - 1}) | {np.median(p[:, 4]):.3f} / {np.max(p[:, 5]):.2f} / "
              f"{np.median(p[:, 6]):.2f} | {np.median(p[:, 0]):.3f} / {np.max(p[:, 1]):.2f} / {np.median(p[:, 2]):.1f} "
              f"({np.median(p[:, 3]):.1f}) | {np.median(p[:, 2]) / np.median(p[:, 6]):.0f}x |")
    for r in results:
        print(f"# {r['phantom']}: phantom build {r['build_s']:.1f} s, registration setup {r['prep_s']:.2f} s, "
              f"first registration (incl. numba load/compile) {r['warm_s']:.2f} s, reasons seen {r['reasons']}, "
              f"quality.ok on {100 * r['ok_rate']:.0f}% (success among ok {100 * r['ok_success']:.0f}%, "
              f"failures passed as ok: {r['failed_but_ok']}), tracking quality.ok {100 * r['trk_ok_rate']:.0f}% "
              f"(reasons seen {r['trk_reasons']}), "
              f"load average at start {r['load_start'][0]:.2f} / end {r['load_end'][0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
