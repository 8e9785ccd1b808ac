"""The service's start-up warm-up compiles (or loads) every numba kernel the live fiducial loop calls.

A kernel first compiled inside the live loop holds the GIL for seconds (late heartbeats, a stale first
pair). Checked in a fresh interpreter, so that kernels other tests happened to run cannot stand in for the
warm-up.
"""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
from spineguide.tracking.service.processing import warm_up_kernels
from spineguide.tracking.localisation import _kernels as K
warm_up_kernels()
sigs = {f: [str(s) for s in getattr(K, f).signatures] for f in ("fit_seeds_lm", "flat_correct")}
print(len(sigs["fit_seeds_lm"]), len(sigs["flat_correct"]),
      sum(s.startswith("(Array(uint16") for s in sigs["flat_correct"]))
"""


def test_warm_up_compiles_the_faint_search_fits_and_the_flat_field_for_every_frame_kind():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600, check=True)
    fits, flat, flat_uint16 = (int(v) for v in out.stdout.split())
    assert fits >= 1  # the seed-shadow fits of the faint verification
    # uint16 and float32 frames, writable and read-only: four specialisations, two of them uint16.
    assert flat == 4 and flat_uint16 == 2
