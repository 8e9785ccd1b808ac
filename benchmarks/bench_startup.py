"""Benchmark: start-up time of the command line (issue 17: `spineguide --help` <= 0.3 s).

Runs ``spineguide --help`` (the installed entry point) ``--repeats`` times as a fresh process and prints
the wall time per run, median and worst, and the heavy modules a plain ``--help`` imports (none expected:
numba, SciPy, OpenCV, SimpleITK and pydicom load on first use).

    python benchmarks/bench_startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    exe = shutil.which("spineguide")
    if exe is None:
        print("spineguide is not installed (pip install -e .)", file=sys.stderr)
        return 2
    subprocess.run([exe, "--help"], capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([exe, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    probe = ("import sys; from spineguide.tracking.cli.main import build_parser\n"
             "try: build_parser().parse_args(['--help'])\nexcept SystemExit: pass\n"
             "print(','.join(m for m in ('numba','scipy','cv2','SimpleITK','pydicom') if m in sys.modules) or '-')")
    heavy = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()[-1]
    print(f"# bench_startup: {' '.join(sys.argv)}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print()
    print("| command | runs | median s | worst s | target | heavy modules imported |")
    print("|---|---|---|---|---|---|")
    print(f"| spineguide --help | {len(times)} | {statistics.median(times):.3f} | {max(times):.3f} | <= 0.3 s | {heavy} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
