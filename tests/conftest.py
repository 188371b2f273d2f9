"""Shared fixtures: paths of the project, the shared data sets, and small configs."""

from __future__ import annotations

import shutil
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


def analysis_project(folder: Path) -> Path:
    """The reference analyses and site profiles copied into ``folder``, reading the shared
    data (Heart-Disease in place, TCGA-BRCA split into centres); skip if it is absent."""
    # Imported here: conftest loads for every test, most of which never need pandas.
    from fedhealth.data.tcga_brca import write_tcga_brca_centres

    data = shared_data()
    if not (data / "uci-heart-disease").is_dir() or not (data / "tcga-brca-flamby").is_dir():
        pytest.skip(f"shared data not found at {data} (set FEDHEALTH_SHARED_DATA)")
    for sub in ("experiments", "sites"):
        shutil.copytree(ROOT / sub, folder / sub)
    for p in (folder / "sites").glob("*.toml"):
        p.write_text(p.read_text().replace("../../shared/data", str(data.resolve())))
    write_tcga_brca_centres(
        data / "tcga-brca-flamby", folder / "workspace" / "demo-data" / "tcga-brca"
    )
    return folder
