"""Deep fuzz run: every ``fuzz``-marked property test with the ``deep`` hypothesis profile (10^5 examples).

Runs each test in its own pytest process (``HYPOTHESIS_PROFILE=deep``) and prints, per test, the
examples hypothesis ran (passing / failing / invalid, from ``--hypothesis-show-statistics``), the
time and the outcome. The suite itself runs the same tests with the bounded ``ci`` profile.

    python benchmarks/fuzz_deep.py                       # all fuzz tests, 2 at a time
    python benchmarks/fuzz_deep.py -k wire --jobs 1      # a subset
    python benchmarks/fuzz_deep.py --budget-s 1800       # stop starting new tests after 30 min
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAT = re.compile(r"(\d+) passing(?: examples?)?, (\d+) failing(?: examples?)?,? (?:and )?(\d+) invalid")


def collect(keyword: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-m", "fuzz", "--collect-only", "-q", "-p", "no:cacheprovider"]
    if keyword:
        cmd += ["-k", keyword]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False).stdout
    return [line.strip() for line in out.splitlines() if "::" in line and not line.startswith(" ")]


def run_one(test_id: str, timeout_s: float) -> dict:
    env = {**os.environ, "HYPOTHESIS_PROFILE": "deep"}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", test_id, "-q", "-p", "no:cacheprovider",
                               "--hypothesis-show-statistics", "--timeout", str(int(timeout_s))],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s + 60, check=False)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text, code = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or ""), -1
    seconds = time.monotonic() - t0
    passing = failing = invalid = 0
    for m in STAT.finditer(text):  # one line per phase (generate, shrink...)
        passing += int(m.group(1))
        failing += int(m.group(2))
        invalid += int(m.group(3))
    outcome = "passed" if code == 0 else ("timeout" if code == -1 else "FAILED")
    tail = "" if code == 0 else text.strip().splitlines()[-1][:160] if text.strip() else ""
    return {"test": test_id, "passing": passing, "failing": failing, "invalid": invalid, "seconds": seconds,
            "outcome": outcome, "tail": tail}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout-s", type=float, default=3600.0, help="per test")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new test after this many seconds")
    args = ap.parse_args()
    tests = collect(args.keyword)
    t_start = time.monotonic()

    def job(test_id):
        if args.budget_s is not None and time.monotonic() - t_start > args.budget_s:
            return {"test": test_id, "passing": 0, "failing": 0, "invalid": 0, "seconds": 0.0,
                    "outcome": "not run", "tail": "budget spent"}
        r = run_one(test_id, args.timeout_s)
        print(f"{r['outcome']:8s} {r['passing']:7d} {r['seconds']:7.0f} s  {test_id}", flush=True)
        return r

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(job, tests))
    print(f"\n{'test':78s} {'passing':>8s} {'failing':>7s} {'invalid':>7s} {'s':>6s}  outcome")
    for r in results:
        print(f"{r['test'][-78:]:78s} {r['passing']:8d} {r['failing']:7d} {r['invalid']:7d} {r['seconds']:6.0f}  "
              f"{r['outcome']} {r['tail']}")
    ran = [r for r in results if r["outcome"] != "not run"]
    print(f"\n{len(ran)} of {len(results)} fuzz tests run, {sum(r['passing'] for r in ran)} passing examples, "
          f"{sum(r['outcome'] == 'FAILED' for r in ran)} failed, {sum(r['outcome'] == 'timeout' for r in ran)} "
          f"timed out, in {time.monotonic() - t_start:.0f} s")
    return 0 if all(r["outcome"] == "passed" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
