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

#: The shared conventions folder sits beside the checkout (../shared).
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED_DIR / "CONVENTIONS.md").exists():
        pytest.fail(f"shared conventions not found at {SHARED_DIR}; the checkout must sit beside shared/")
    return SHARED_DIR


@pytest.fixture(scope="session")
def conventions_vectors(shared_dir) -> dict:
    return json.loads((shared_dir / "examples" / "conventions-vectors.json").read_text())
