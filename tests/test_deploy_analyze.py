"""``fedhealth analyze --federation`` on a real deployment: coordinator (SuperLink + MLflow
server) and three sites as separate processes on 127.0.0.1 with TLS and SuperNode
authentication. The analysis travels as a ``query.analysis`` message through the
SuperLink to each site's own ClientApp; each site admits it under its policy, charges its
ledger before anything leaves, and the pooled result lands in the coordinator's MLflow.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedhealth.config.site import load_site
from fedhealth.privacy.dp.ledger import PrivacyLedger
from fedhealth.site.audit import audit_path, read
from tests.deploy_harness import SITES, provisioned_consortium

pytestmark = pytest.mark.slow

ANALYSIS = """
[analysis]
name = "deploy-feasibility"
sites = [{sites}]
dataset = "breast-cancer"
min_sites = 2

[columns]
mean_radius = {{ type = "numeric", lower = 5, upper = 30 }}
[columns.diagnosis]
type = "categorical"
categories = {{ benign = "benign", malignant = "malignant" }}

[[queries]]
kind = "count"

[[queries]]
kind = "count"
by = ["diagnosis"]

[[queries]]
kind = "mean"
column = "mean_radius"

[privacy]
epsilon = 1.0
delta = 1e-5
"""


def _analysis_charges(root: Path, site: str) -> list:
    profile = load_site(root / "sites" / f"{site}.toml")
    if not profile.ledger_path.is_file():
        return []
    with PrivacyLedger(profile.ledger_path) as ledger:
        return [e for e in ledger.entries("breast-cancer") if e.experiment.startswith("analysis:")]


def test_analysis_over_a_real_federation_is_charged_at_every_site(tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("deploy-analyze")
    dep = provisioned_consortium(root, SITES, he=False)
    try:
        dep.start_coordinator()
        dep.start_sites(SITES)
        path = root / "feasibility.analysis.toml"
        path.write_text(ANALYSIS.format(sites=", ".join(f'"sites/{s}.toml"' for s in SITES)))
        res = dep.cli(
            "analyze", str(path), "--federation", "test", "--tracking-uri", dep.tracking_uri,
            timeout=600,
        )  # fmt: skip
        out = res.stdout + res.stderr
        assert res.returncode == 0, out[-4000:]
        assert "privacy per site" in out, out[-4000:]
        for query in ("count", "count-by-diagnosis", "mean-mean_radius"):
            assert query in out, (query, out[-4000:])
    finally:
        dep.teardown()
    for site in SITES:
        # One charge per site, at most the analysis's ε, recorded before the answer left.
        (charge,) = _analysis_charges(root, site)
        assert 0 < charge.epsilon_increment <= 1.0 + 1e-9, site
        events = [
            r for r in read(audit_path(root / "site-ws" / site))
            if "analysis" in str(r.get("handler", "")) or "analysis" in str(r.get("experiment", ""))
        ]  # fmt: skip
        assert events, f"{site}: the analysis is not in the site's audit log"
        # The site's audit never holds a data value: only counts of what it released.
        assert not any("malignant," in str(r) or "benign," in str(r) for r in events), site
