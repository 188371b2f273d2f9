"""The site console (issue 13) driven in a real browser, and its security attacked.

A quickstart consortium is written to a temporary folder with st-olav switched to
``approval = "manual"``; a training request sent to st-olav in this process (the real
ClientApp handler, ``dp_consortium.train_round``) leaves a pending study. Headless
Chromium (Debian's ``chromium`` and ``chromium-driver``, through Selenium) logs in with the
printed token, approves it (the next round trains and is charged), denies another (its
round is refused ``study-declined``), and saves a screenshot of each page (into
``docs/images/console-*.png`` with FEDHEALTH_SCREENSHOTS=1, else a temporary folder). Plain
HTTP requests then try what a browser page or a colleague without the right secret could:
no token, no CSRF token, the read-only token.
"""

from __future__ import annotations

import re
import secrets
import shutil
import sys
import threading
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from dp_consortium import refusal, reply_metrics, train_round

from fedhealth.config.experiment import load_experiment
from fedhealth.config.site import load_site
from fedhealth.data.demo import write_demo_data
from fedhealth.privacy.he.demo import ensure_consortium
from fedhealth.site.approvals import list_studies, study_status
from fedhealth.site.console.app import create_app
from fedhealth.site.console.auth import Secrets, password_path, set_password
from fedhealth.study import study_hash
from tests.conftest import SCREENSHOTS

SITES = ["st-olav", "karolinska", "charite"]
IMAGES = SCREENSHOTS


def _patch(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="module")
def project(tmp_path_factory, request) -> Path:
    """The quickstart consortium; st-olav decides studies by hand; its experiment trains
    in plaintext with site normalisation (one site's handler can run it alone)."""
    root = Path(request.config.rootpath)
    work = tmp_path_factory.mktemp("console")
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(root / folder, work / folder)
    write_demo_data(work / "workspace" / "demo-data", SITES, images_per_site=24)
    ensure_consortium(work / "workspace" / "consortium", SITES, key_holder=SITES[0])
    _patch(work / "sites" / "st-olav.toml", "[privacy]\n", '[privacy]\napproval = "manual"\n')
    exp = work / "experiments" / "quickstart.toml"
    _patch(exp, "rounds = 5", "rounds = 2")
    _patch(exp, 'normalisation = "consortium"', 'normalisation = "site"')
    _patch(exp, "enabled = true\nkeys_dir", "enabled = false\nkeys_dir")
    return work


def variant(project: Path, name: str, seed: int) -> Path:
    """Another study of the same consortium (another seed: another study hash)."""
    text = (project / "experiments" / "quickstart.toml").read_text()
    out = project / "experiments" / f"{name}.toml"
    out.write_text(text.replace("seed = 42", f"seed = {seed}", 1))
    return out


def pending_study(exp: Path) -> str:
    """Send st-olav a training request; it is held for its operator."""
    assert refusal(train_round(exp, 0, 1)[0])["rule"] == "study-pending"
    return study_hash(load_experiment(exp).task_spec())


def st_olav(project: Path):
    return load_site(project / "sites" / "st-olav.toml")


@pytest.fixture(scope="module")
def keys() -> Secrets:
    """An operator token and a read-only token, as ``fedhealth site console`` makes them."""
    return Secrets(token=secrets.token_urlsafe(32), read_only_token=secrets.token_urlsafe(32))


@pytest.fixture(scope="module")
def base(project, keys) -> str:
    """The console of st-olav, served on 127.0.0.1 by werkzeug in a thread."""
    from werkzeug.serving import make_server

    server = make_server(
        "127.0.0.1", 0, create_app(project / "sites" / "st-olav.toml", keys), threaded=True
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def click(browser, element) -> None:
    """Click a link or submit button and wait until the next page has replaced this one."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    old = browser.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(browser, 20).until(ec.staleness_of(old))


def shoot(browser, name: str) -> None:
    """Save the whole page as docs/images/console-<name>.png."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    height = browser.execute_script("return document.body.scrollHeight")
    browser.set_window_size(1280, max(700, min(int(height) + 40, 3000)))
    browser.save_screenshot(str(IMAGES / f"console-{name}.png"))


# -- in the browser ----------------------------------------------------------------------------


def test_operator_logs_in_approves_and_denies_in_chromium(project, base, keys, browser):
    from selenium.webdriver.common.by import By

    site = st_olav(project)
    exp = project / "experiments" / "quickstart.toml"
    study = pending_study(exp)

    browser.get(base + "/studies")  # not logged in: the login page
    assert browser.current_url.endswith("/login")
    shoot(browser, "login")
    browser.find_element(By.ID, "secret").send_keys("not-the-token")
    click(browser, browser.find_element(By.ID, "login"))
    assert "not this console's token" in browser.find_element(By.ID, "login-error").text
    browser.find_element(By.ID, "secret").send_keys(keys.token)
    click(browser, browser.find_element(By.ID, "login"))

    # Overview: the policy in words, datasets as counts, the SuperNode's state.
    body = browser.find_element(By.TAG_NAME, "body").text
    assert "Every study waits for a person's decision here" in body
    datasets = browser.find_element(By.ID, "datasets").text
    n = len((project / "workspace/demo-data/st-olav/breast-cancer.csv").read_text().splitlines())
    assert f"{n - 1:,} records" in datasets and "phantoms" in datasets
    assert "not running" in browser.find_element(By.ID, "connection").text
    assert "mean_radius" not in body  # no column of a record, let alone a value
    shoot(browser, "overview")

    # Studies: the pending study with what it asks for; approve it.
    click(browser, browser.find_element(By.ID, "nav-studies"))
    card = browser.find_element(By.ID, f"study-{study}")
    for expected in ("quickstart", "breast-cancer", "mlp", "fedavg", "target_epsilon=1.0",
                     "projected ε here", "lifetime budget 20"):  # fmt: skip
        assert expected in card.text, expected
    shoot(browser, "studies")
    card.find_element(By.NAME, "by").clear()
    card.find_element(By.NAME, "by").send_keys("Dr. Nilsen")
    click(browser, browser.find_element(By.ID, f"approve-{study[:12]}"))
    assert "approved by Dr. Nilsen" in browser.find_element(By.CLASS_NAME, "flash-ok").text
    status, decision = study_status(site, study)
    assert status == "approved" and decision.by == "Dr. Nilsen"  # signature verified

    # The run proceeds: st-olav trains both rounds and charges its ledger.
    reply, arrays = train_round(exp, 0, 1)
    assert reply_metrics(reply)["epsilon"] > 0
    reply_metrics(train_round(exp, 0, 2, arrays=arrays)[0])

    # A second study: denied in the browser, its round is refused and charges nothing.
    other = variant(project, "quickstart-other", seed=7)
    denied = pending_study(other)
    browser.get(base + "/studies")
    click(browser, browser.find_element(By.ID, f"deny-{denied[:12]}"))
    assert study_status(site, denied)[0] == "declined"
    from fedhealth.privacy.dp.ledger import PrivacyLedger

    with PrivacyLedger(site.ledger_path) as ledger:
        before = len(ledger.entries())
    assert refusal(train_round(other, 0, 1)[0])["rule"] == "study-declined"
    with PrivacyLedger(site.ledger_path) as ledger:
        assert len(ledger.entries()) == before
    decided = browser.find_element(By.ID, "decided").text
    assert "declined" in decided and "approved" in decided and "Dr. Nilsen" in decided
    shoot(browser, "studies-decided")

    # Privacy: the chart, each charge, the integrity check.
    click(browser, browser.find_element(By.ID, "nav-privacy"))
    assert "verified" in browser.find_element(By.ID, "integrity").text
    assert browser.find_elements(By.CSS_SELECTOR, ".chart svg")
    rows = browser.find_elements(By.CSS_SELECTOR, "#ledger tbody tr")
    assert len(rows) == before and "quickstart" in rows[0].text
    shoot(browser, "privacy")

    # Audit: what left (linked to its charge), and the refusals with their reasons.
    click(browser, browser.find_element(By.ID, "nav-audit"))
    assert "study-declined" in browser.find_element(By.ID, "refusals").text
    assert "study-pending" in browser.find_element(By.ID, "refusals").text
    links = browser.find_elements(By.CSS_SELECTOR, "#timeline a[href*='#charge-']")
    assert links, "no update linked to its ledger charge"
    shoot(browser, "audit")


# -- attacks over plain HTTP -------------------------------------------------------------------


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(base: str, secret: str) -> requests.Session:
    s = requests.Session()
    token = _csrf(s.get(base + "/login", timeout=10).text)
    r = s.post(base + "/login", data={"secret": secret, "csrf_token": token}, timeout=10,
               allow_redirects=False)  # fmt: skip
    assert r.status_code == 302, r.text
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return s


def test_no_token_no_page_and_no_decision(project, base):
    study = pending_study(variant(project, "quickstart-anon", seed=11))
    for page in ("/", "/studies", "/privacy", "/audit"):
        r = requests.get(base + page, timeout=10, allow_redirects=False)
        assert r.status_code == 302 and r.headers["Location"].endswith("/login")
        assert study not in r.text
    r = requests.post(base + f"/studies/{study}/decide",
                      data={"verdict": "approved", "by": "x"}, timeout=10)  # fmt: skip
    assert r.status_code in (400, 401)
    # A wrong token, and a login form posted without its CSRF token, are refused.
    s = requests.Session()
    token = _csrf(s.get(base + "/login", timeout=10).text)
    r = s.post(base + "/login", data={"secret": "guess", "csrf_token": token}, timeout=10)
    assert r.status_code == 401
    assert s.get(base + "/studies", timeout=10, allow_redirects=False).status_code == 302
    r = s.post(base + "/login", data={"secret": "guess"}, timeout=10)
    assert r.status_code == 400 and "CSRF" in r.text
    assert study_status(st_olav(project), study)[0] == "pending"


def test_a_post_without_the_csrf_token_is_refused(project, base, keys):
    study = pending_study(variant(project, "quickstart-csrf", seed=12))
    s = login(base, keys.token)
    url = base + f"/studies/{study}/decide"
    r = s.post(url, data={"verdict": "approved", "by": "x"}, timeout=10)
    assert r.status_code == 400 and "CSRF token is missing" in r.text
    r = s.post(url, data={"verdict": "approved", "by": "x", "csrf_token": "forged"}, timeout=10)
    assert r.status_code == 400
    assert study_status(st_olav(project), study)[0] == "pending"
    # The same request with the page's token goes through: the refusal was the CSRF check.
    token = _csrf(s.get(base + "/studies", timeout=10).text)
    r = s.post(url, data={"verdict": "declined", "by": "x", "csrf_token": token}, timeout=10)
    assert r.status_code == 200 and study_status(st_olav(project), study)[0] == "declined"


def test_the_read_only_token_sees_but_cannot_decide(project, base, keys):
    study = pending_study(variant(project, "quickstart-viewer", seed=13))
    s = login(base, keys.read_only_token)
    page = s.get(base + "/studies", timeout=10).text
    assert study in page and "approve-" not in page and "Read-only" in page
    r = s.post(base + f"/studies/{study}/decide",
               data={"verdict": "approved", "by": "viewer", "csrf_token": _csrf(page)},
               timeout=10)  # fmt: skip
    assert r.status_code == 403 and "read-only" in r.text
    assert study_status(st_olav(project), study)[0] == "pending"
    (record,) = [x for x in list_studies(st_olav(project)) if x["study"] == study]
    assert record["decision"] is None


def test_operator_password_is_stored_hashed_0600(project):
    site = st_olav(project)
    with pytest.raises(Exception, match="at least 12 characters"):
        set_password(site, "short")
    path = set_password(site, "correct horse battery")
    assert path == password_path(site) and (path.stat().st_mode & 0o777) == 0o600
    assert "correct horse" not in path.read_text()
    keys = Secrets.generate(site)
    assert keys.role_of("correct horse battery") == "operator"
    assert keys.role_of("correct horse batter") is None
    path.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        Secrets.generate(site)
    path.unlink()
