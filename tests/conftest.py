"""Shared pytest configuration for spineguide."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Fuzz budgets. Property tests that do not set ``max_examples`` themselves take it from the profile:
# ``ci`` (default, bounded so the whole suite stays fast) or ``deep`` (>= 10^5 examples per parser, the
# figure docs/ROBUSTNESS.md reports): ``HYPOTHESIS_PROFILE=deep python -m pytest -m fuzz``.
settings.register_profile("ci", max_examples=400, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("deep", max_examples=100_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: Data files the tests read (worked convention vectors, example geometry; docs/CONVENTIONS.md).
DATA_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def conventions_vectors(data_dir) -> dict:
    return json.loads((data_dir / "conventions-vectors.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def simulated_case(tmp_path_factory):
    """A written virtual-room data set (CT, geometry, frames, fiducials, DICOM plan, truth): 512 px panels of
    0.8 mm, 2 mm truth grid, one pose. Shared by the CLI tests (tests/tracking/test_cli*.py); read-only."""
    from spineguide.calibration.geometry import default_stereo_geometry
    from spineguide.tracking.room import thoracolumbar_phantom, write_simulation

    folder = tmp_path_factory.mktemp("sim")
    phantom = thoracolumbar_phantom(truth_spacing_mm=2.0, planning_spacing_mm=(1.5, 1.5, 2.0), seed=3)
    write_simulation(folder, phantom, 1, seed=11, geometry=default_stereo_geometry(512, 0.8))
    truth = json.loads((folder / "truth.json").read_text(encoding="utf-8"))
    return folder, truth
