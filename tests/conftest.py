"""Shared pytest configuration for spineguide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
