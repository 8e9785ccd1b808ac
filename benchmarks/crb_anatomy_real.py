#!/usr/bin/env python3
"""Cramer-Rao bound of the stereo 6-DoF pose on the real-CT validation set (issue 12): how well *any* unbiased
estimator could register these frames, against what the registration reaches.

For each case (stereo pair at the truth pose) the Fisher information of the pose ``x`` (translation mm, rotation deg
about the target vertebra's centre, room axes) carried by the raw counts of both panels is

    F = sum over views and binned pixels of  b^2 mu_p^2 (dp/dx)(dp/dx)^T / (mu + sigma_read^2)

with ``p`` the line integral through the **whole CT** (the patient as one rigid body: the ROI, its neighbours, ribs,
pelvis, everything the CT holds; more than the registration uses), ``dp/dx`` from Joseph's projector's exact pose
derivatives (``compute_drr_pose_derivatives``) at the truth pose, ``mu`` the expected counts per pixel (the frame's
flat-field-corrected counts, block-averaged and smoothed: primary + scatter), ``sigma_read`` the chain's read-out
noise per pixel, and ``b`` the binning of the bound's pixel grid (counts add up in a bin).

Every simplification makes the information larger, so the bound stays a valid *lower* bound on the error:
- ``mu_p`` (the primary counts, whose change carries the signal) is taken as **all** the measured counts
  (``--primary all``, default), scatter included; ``--primary drr`` uses ``i0 exp(-p)`` of the effective-energy DRR
  instead (capped at the measured counts): closer to the truth, but not guaranteed optimistic;
- the detector blur, lag, gain-map noise and dead lines are ignored, and so is everything outside the CT
  (the couch, tissue beyond its ends: not in the model, no information about the pose);
- the whole panel is used (``--region roi`` restricts it to the panel region the registration reads).

The bound's covariance ``C = F^-1`` is turned into an mTRE distribution over the target vertebra's voxels by
sampling pose errors ``N(0, C)`` (200 per case); the table pools them over the cases, beside the registration's own
median / p95 mTRE on the same cases when ``--compare`` is given (run ``bench_anatomy_real.py`` first and pass its
stdout).

Run:  python benchmarks/crb_anatomy_real.py --set /work/realct_i2k [--compare bench_output.txt]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spineguide.calibration.io import read_geometry  # noqa: E402
from spineguide.registration.anatomy import AnatomyConfig, AnatomyRegistration, RegionOfInterest  # noqa: E402
from spineguide.registration.ctfile import read_ct  # noqa: E402
from spineguide.registration.drr import AttenuationVolume, PanelRegion, compute_drr_pose_derivatives  # noqa: E402
from spineguide.registration.pose import Pose, rotation_matrix  # noqa: E402
from spineguide.tracking.localisation.flatfield import correct_frames, flat_fields_from_geometry_file  # noqa: E402
from bench_anatomy_real import _frames, _pose  # noqa: E402

SAMPLES_PER_CASE = 200


def _dpose(truth: Pose, centre: np.ndarray) -> np.ndarray:
    """``d pose.matrix / d x`` at ``x = 0`` for ``x`` = (translation mm, rotation deg about ``centre``) after ``truth``."""

    def pose(x):
        r = rotation_matrix(x[3:])
        return Pose(r, centre + x[:3] - r @ centre).compose(truth).matrix

    eps = 1e-6
    return np.stack([(pose(eps * e) - pose(-eps * e)) / (2 * eps) for e in np.eye(6)])


def _expected_counts(corrected: np.ndarray, b: int) -> np.ndarray:
    """Expected counts per panel pixel on the ``b``-binned grid: block mean, then a 2-bin Gaussian (noise averaged)."""
    import cv2

    rows, cols = corrected.shape[0] // b, corrected.shape[1] // b
    m = corrected[: rows * b, : cols * b].reshape(rows, b, cols, b).mean(axis=(1, 3))
    return cv2.GaussianBlur(m.astype(np.float32), (0, 0), 2.0).astype(np.float64)


def case_fisher(folder: Path, ct, labels, args, cache: dict) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fisher information (6 x 6, per mm and deg) of one case's stereo pair; target points (room mm); info."""
    truth = json.loads((folder / "truth.json").read_text())
    iso = truth["isocentre_lps_mm"]
    geometry = read_geometry(folder / "geometry.json")
    flat = flat_fields_from_geometry_file(folder / "geometry.json")
    raw = correct_frames(flat, _frames(folder, truth["frames"]))
    pose = _pose(truth["pose"])
    settings = truth["imaging"].get("settings", {})
    read_noise = float(settings.get("electronic_noise_counts", 0.0))
    i0 = float(truth["i0"])
    key = tuple(np.round(iso, 6))
    if key not in cache:
        cache[key] = AttenuationVolume.from_ct(ct, iso, energy_kev=float(truth.get("energy_kev", 60.0)))
    volume = cache[key]
    idx = np.argwhere(labels == truth["label"])[:, ::-1].astype(float)
    pts = ct.lps_to_room(ct.index_to_lps(idx), iso)  # perfect setup, room mm
    moved = pose.apply(pts)
    centre = moved.mean(axis=0)
    dpose = _dpose(pose, centre)
    b = args.binning
    fisher = np.zeros((6, 6))
    regions = {}
    if args.region == "roi":
        roi = RegionOfInterest.from_labels(ct, labels, truth["label"], neighbours=1)
        reg = AnatomyRegistration(ct, iso, geometry, roi, AnatomyConfig())
        for name in geometry.names:
            region, _, _ = reg._region(geometry[name], pose, b)
            regions[name] = region
    for name in geometry.names:
        im = geometry[name]
        whole = PanelRegion.whole(im)
        out = compute_drr_pose_derivatives(volume, im, pose, dpose, whole, b).astype(np.float64)
        p, dp = out[0], out[1:]
        mu = _expected_counts(np.asarray(raw[name], dtype=np.float64), b)[: p.shape[0], : p.shape[1]]
        mu = np.maximum(mu, 0.0)
        if args.primary == "all":
            mu_p = mu
        else:
            mu_p = np.minimum(i0 * np.exp(-p), mu)
        w = (b * b) * mu_p ** 2 / (mu + read_noise ** 2 + 1e-9)
        if args.region == "roi":
            r = regions[name]
            keep = np.zeros_like(w, dtype=bool)
            keep[r.row0 // b : (r.row0 + r.rows) // b, r.col0 // b : (r.col0 + r.cols) // b] = True
            w = np.where(keep, w, 0.0)
        g = dp.reshape(6, -1)
        fisher += (g * w.ravel()) @ g.T
    return fisher, moved, {"case": folder.name, "level": truth["level"], "room": truth["room"],
                           "projector": truth["projector"], "i0": i0}


def mtre_samples(fisher: np.ndarray, moved: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """mTRE (mm) of ``n`` pose errors drawn from ``N(0, F^-1)``, over the target points (room mm, truth pose)."""
    cov = np.linalg.inv(fisher)
    centre = moved.mean(axis=0)
    arm = moved - centre
    x = rng.multivariate_normal(np.zeros(6), cov, size=n)
    out = np.empty(n)
    for k in range(n):
        rot = np.radians(x[k, 3:])
        disp = x[k, :3] + np.cross(rot, arm)  # first order: small errors
        out[k] = np.mean(np.linalg.norm(disp, axis=1))
    return out


def _bench_mtre(path: Path) -> dict[str, float]:
    """Per-case full-registration mTRE from a ``bench_anatomy_real.py`` stdout."""
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*case (\S+) .* full mTRE ([0-9.]+) mm", line)
        if m:
            out[m.group(1).split("/")[-1]] = float(m.group(2))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="folder written by datasets/realct/build.py")
    parser.add_argument("--cases", type=int, default=None, help="first N cases only")
    parser.add_argument("--binning", type=int, default=2, help="pixel grid of the bound (panel pixels per bin)")
    parser.add_argument("--primary", choices=("all", "drr"), default="all")
    parser.add_argument("--region", choices=("panel", "roi"), default="panel")
    parser.add_argument("--compare", type=Path, default=None, help="bench_anatomy_real.py stdout on the same set")
    args = parser.parse_args(argv)
    ct = read_ct(args.set / "ct.mha")
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(args.set / "labels.mha")))
    folders = sorted((args.set / "cases").iterdir())[: args.cases]
    ours = _bench_mtre(args.compare) if args.compare else {}
    rng = np.random.default_rng(0)
    cache: dict = {}
    pooled, per_case_median, mine = [], [], []
    print(f"# crb_anatomy_real: {' '.join(sys.argv)}")
    for folder in folders:
        fisher, moved, info = case_fisher(folder, ct, labels, args, cache)
        s = mtre_samples(fisher, moved, rng, SAMPLES_PER_CASE)
        std = np.sqrt(np.diag(np.linalg.inv(fisher)))
        pooled.append(s)
        per_case_median.append(float(np.median(s)))
        extra = ""
        if info["case"] in ours:
            mine.append(ours[info["case"]])
            extra = f" | registration {ours[info['case']]:.3f} mm"
        print(f"  case {info['case']} {info['level']:>3s} {info['room']:>7s} {info['projector']:>11s} i0 {info['i0']:g}: "
              f"bound std {std[0]:.3f} {std[1]:.3f} {std[2]:.3f} mm, {std[3]:.3f} {std[4]:.3f} {std[5]:.3f} deg; "
              f"mTRE median {np.median(s):.3f} mm{extra}")
    allv = np.concatenate(pooled)
    print()
    print("| set | cases | bound: median / p95 mTRE mm (pooled samples) | registration: median / p95 mTRE mm | ratio of medians |")
    print("|---|---|---|---|---|")
    reg_cell, ratio = "-", "-"
    if mine:
        reg_cell = f"{np.median(mine):.3f} / {np.percentile(mine, 95):.3f}"
        ratio = f"{np.median(mine) / np.median(allv):.2f}"
    print(f"| {args.set.name} ({args.primary} counts as primary, {args.region}, binning {args.binning}) | {len(folders)} | "
          f"{np.median(allv):.3f} / {np.percentile(allv, 95):.3f} | {reg_cell} | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
