"""Shared fixtures: where the real datasets live, and offline-friendly environment defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.settings import apply_env_defaults

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# The offline defaults every entry point applies (no telemetry, no update checks, the checkout's PREFECT_HOME),
# set once for the whole session before any test imports prefect or mlflow.
apply_env_defaults()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real E2E/WebNLG/DART files from ../shared/data; the test is skipped when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (../shared/data is absent in this checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
