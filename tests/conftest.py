"""Shared fixtures: paths of the project, the shared data sets, small configs, a browser."""

from __future__ import annotations

import os
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
