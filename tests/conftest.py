"""Shared fixtures: paths of the project, the shared data sets, and small configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhealth import settings

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    """``../shared/data`` beside the project (or ``$FEDHEALTH_SHARED_DATA``)."""
    return settings.SHARED_DATA.get()


@pytest.fixture
def root() -> Path:
    """The project root."""
    return ROOT


@pytest.fixture
def heart_dir() -> Path:
    """The UCI Heart-Disease folder, or skip saying where it was looked for."""
    d = shared_data() / "uci-heart-disease"
    if not d.is_dir():
        pytest.skip(f"shared data not found at {d} (set FEDHEALTH_SHARED_DATA)")
    return d
