"""A training run's HTML report, opened from a real MLflow server in headless Chromium.

An ``mlflow server`` (SQLite backend store, artifacts served by the server from a local
folder) runs on a free port of 127.0.0.1 for this module and is stopped at its end.
``fedhealth run`` trains a tiny two-site experiment against it (a Flower simulation, DP-SGD,
exact metrics) and prints where the report opens in MLflow's web UI. Chromium loads that
address: the UI fetches ``report.html`` from the server (``/get-artifact``) and shows it in a
sandboxed frame, where every image must have decoded, no script may be present and every
expected plot must be there by its title. A screenshot goes to
``docs/images/run-report.png`` with FEDHEALTH_SCREENSHOTS=1.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from dp_consortium import write_experiment, write_site

from fedhealth.cli.main import app
from fedhealth.deploy.processes import child_env, free_port, kill_tree, venv_bin
from fedhealth.registry.report import CALIBRATION_TITLE, REPORT_FILE, ROC_TITLE
from tests.conftest import SCREENSHOTS

pytestmark = pytest.mark.slow

IMAGES = SCREENSHOTS
EXPECTED = ["accuracy per round", "loss per round", "ε per site over rounds", ROC_TITLE,
            CALIBRATION_TITLE]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 (SQLite, local artifact root); its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    argv = [
        str(venv_bin() / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = root / "mlflow.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),  # as the coordinator
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, (
                f"mlflow server not up in 120 s: {log.read_text()[-3000:]}"
            )
            time.sleep(0.3)
        yield uri
    finally:
        kill_tree(proc.pid, timeout=10)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory) -> tuple[str, str]:
    """A two-round, two-site run recorded on the server: (UI address of its report, run id)."""
    root = tmp_path_factory.mktemp("consortium")
    sites = [write_site(root, name, 240, i) for i, name in enumerate(("h1", "h2"))]
    exp = write_experiment(root, sites, name="report-demo", rounds=2, dp={"noise_multiplier": 1.0})
    result = CliRunner().invoke(
        app, ["run", str(exp), "--tracking-uri", server], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 0, result.output
    assert "AUROC of the final model" in result.output
    found = re.search(r"in the MLflow UI: (\S+)", result.output)
    assert found, result.output
    url = found[1]
    assert url.startswith(f"{server}/#/experiments/") and url.endswith(f"/artifacts/{REPORT_FILE}")
    return url, url.split("/runs/")[1].split("/")[0]


def test_the_server_serves_the_report_as_a_page_without_script(server, trained):
    _, run_id = trained
    r = requests.get(
        f"{server}/get-artifact", params={"path": REPORT_FILE, "run_uuid": run_id}, timeout=30
    )
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.content.decode("utf-8")  # the page declares its charset; the header does not
    assert "<script" not in page.lower() and all(t in page for t in EXPECTED)
    # Every image is inline: the page needs nothing but itself.
    assert re.findall(r'<img [^>]*src="([^"]{0,22})', page) == ["data:image/png;base64,"] * len(
        EXPECTED
    )


def test_the_report_opens_in_the_mlflow_ui_and_shows_its_plots(browser, trained):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = trained
    browser.set_window_size(1280, 1000)
    browser.get(url)
    frame = WebDriverWait(browser, 90).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "iframe.mlflow-html-iframe"))
    )
    browser.switch_to.frame(frame)
    try:
        WebDriverWait(browser, 30).until(
            lambda b: b.execute_script(
                "return document.images.length > 0 && "
                "Array.from(document.images).every(i => i.complete)"
            )
        )
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.naturalWidth])"
        )
        scripts = browser.execute_script("return document.scripts.length")
        captions = [e.text for e in browser.find_elements(By.TAG_NAME, "figcaption")]
        title = browser.execute_script("return document.title")
        sites = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "tbody tr td:first-child")]
        # For the screenshot: the final round's ROC in view.
        browser.execute_script(f"document.images[{EXPECTED.index(ROC_TITLE)}].scrollIntoView()")
    finally:
        browser.switch_to.default_content()
    assert title == "fedhealth run report-demo"
    assert scripts == 0
    assert [alt for alt, _ in images] == EXPECTED == captions
    assert all(width > 0 for _, width in images), images  # every PNG decoded
    assert sites == ["h1", "h2", "pooled"]  # the final round's table
    IMAGES.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(IMAGES / "run-report.png"))
