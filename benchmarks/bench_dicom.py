"""Import time of a DICOM plan: 200-slice CT series + RT Structure Set + RT Plan (issue 7 target <= 3 s).

Usage::

    python benchmarks/bench_dicom.py [--repeats 5] [--slices 200]

Writes the virtual room's thoracolumbar phantom as synthetic DICOM (planning
grid 0.9766 x 0.9766 mm in-plane, slice step chosen for the requested slice
count over its 270 mm field), then times ``spineguide.registration.plan.load_dicom_plan``
(scan headers, read and check the CT series, read and rasterise every ROI,
read the plan) and its parts. Seeded; a warm-up run first (file cache).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spineguide.registration.dicom_ct import read_dicom_ct_files  # noqa: E402
from spineguide.registration.dicom_rt import ContourType, rasterise_contours, read_rtstruct, scan_dicom_folder  # noqa: E402
from spineguide.registration.plan import load_dicom_plan  # noqa: E402
from spineguide.tracking.room.dicom import write_dicom_plan  # noqa: E402
from spineguide.tracking.room.phantoms import thoracolumbar_phantom  # noqa: E402


def _stats(times):
    t = np.array(times)
    return float(np.median(t)), float(np.percentile(t, 95))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slices", type=int, default=200)
    args = ap.parse_args()
    step = 270.0 / args.slices
    t0 = time.monotonic()
    phantom = thoracolumbar_phantom(truth_spacing_mm=3.0, planning_spacing_mm=(0.9766, 0.9766, step), seed=0)
    t_build = time.monotonic() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        files = write_dicom_plan(phantom, Path(tmp) / "plan")
        t_write = time.monotonic() - t0
        nk, nj, ni = phantom.planning_ct.hu.shape
        n_contours = sum(len(r.contours_lps_mm) for r in read_rtstruct(files.rtstruct).rois)
        size_mb = sum(p.stat().st_size for p in Path(tmp, "plan").iterdir()) / 1e6
        load_dicom_plan(files.out_dir)  # warm-up (file cache, imports)
        parts = {"scan headers": [], "CT series (read + checks + HU)": [], "RTSTRUCT read": [], "ROI rasterisation": [],
                 "load_dicom_plan total": []}
        for _ in range(args.repeats):
            t0 = time.monotonic()
            inv = scan_dicom_folder(files.out_dir)
            t1 = time.monotonic()
            ct = read_dicom_ct_files(inv.ct_series[0].paths, files.out_dir)
            t2 = time.monotonic()
            ss = read_rtstruct(files.rtstruct)
            t3 = time.monotonic()
            for roi in ss.rois:
                if roi.geometric_type is ContourType.CLOSED_PLANAR:
                    rasterise_contours(roi.contours_lps_mm, ct, roi.name)
            t4 = time.monotonic()
            load_dicom_plan(files.out_dir)
            t5 = time.monotonic()
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                parts[key].append(dt)
    print(f"# bench_dicom: {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"numpy {np.__version__}")
    print(f"data: CT {ni}x{nj}x{nk} voxels (0.9766 x 0.9766 x {step:.3f} mm), int16, {len(files.ct_files)} files; "
          f"RTSTRUCT {len(phantom.label_names)} vertebra ROIs, {n_contours} contours/points; RTPLAN; {size_mb:.1f} MB")
    print(f"phantom build {t_build:.1f} s, DICOM write {t_write:.1f} s (not part of the import)")
    print()
    print(f"| step ({args.repeats} repeats) | median (s) | p95 (s) |")
    print("|---|---|---|")
    for key, times in parts.items():
        med, p95 = _stats(times)
        print(f"| {key} | {med:.3f} | {p95:.3f} |")


if __name__ == "__main__":
    main()
