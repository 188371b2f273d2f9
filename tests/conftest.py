"""Shared fixtures: paths of the project, the shared data sets, small configs, a browser."""

from __future__ import annotations

import os
import shutil
import tempfile
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


#: Where browser tests save their screenshots: the docs' images with FEDHEALTH_SCREENSHOTS=1
#: (to refresh them on purpose), else a temporary folder, so a test run leaves the tree clean.
SCREENSHOTS = (
    ROOT / "docs" / "images"
    if os.environ.get("FEDHEALTH_SCREENSHOTS")
    else Path(tempfile.gettempdir()) / "fedhealth-screenshots"
)


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


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through Selenium; skips only where Chromium is absent and CI unset."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("CI is set but chromium/chromedriver are missing: .ci/run installs them")
        pytest.skip("headless Chromium not installed: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--disable-gpu"):  # fmt: skip
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.implicitly_wait(5)
    yield b
    b.quit()
