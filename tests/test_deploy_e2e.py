"""End to end on a real deployment: coordinator (SuperLink + MLflow server) and three sites
as separate processes on 127.0.0.1 with TLS and SuperNode authentication.

One run survives a site killed mid-round and a coordinator killed mid-run (resumed with
``fedhealth run --resume``) and registers exactly one model version with full provenance.
Also: an unregistered SuperNode key and a client without the consortium CA are refused,
and a failed run makes ``fedhealth run`` exit non-zero.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedhealth.deploy.audit import audit_path, read
from fedhealth.deploy.pki import make_node_keypair, write_private, write_public
from fedhealth.deploy.processes import free_port, kill_tree
from tests.deploy_harness import (
    SITES,
    Deployment,
    provisioned_consortium,
    write_experiment,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    dep = provisioned_consortium(root, SITES)
    try:
        dep.start_coordinator()
        dep.start_sites(SITES)
        yield dep
    finally:
        dep.teardown()


def _site_ws(dep: Deployment, site: str) -> Path:
    return dep.root / "site-ws" / site


def _wait(cond, timeout: float, what: str, poll: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _received(dep: Deployment, site: str, handler: str, round_: int) -> bool:
    return any(
        r["event"] == "received" and r.get("handler") == handler and r.get("round") == round_
        for r in read(audit_path(_site_ws(dep, site)))
    )


def _checkpoints(dep: Deployment, run_id: str) -> list[str]:
    import mlflow

    client = mlflow.tracking.MlflowClient(dep.tracking_uri)
    try:
        return [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    except Exception:  # noqa: BLE001 - server restarting
        return []


def _mlflow_run(dep: Deployment, experiment: str) -> str | None:
    import mlflow

    client = mlflow.tracking.MlflowClient(dep.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return runs[0].info.run_id if runs else None


def _run_node(dep: Deployment, argv: list[str], name: str) -> tuple[int, str]:
    """Run a SuperNode until it gives up; its helpers keep no pipe open."""
    log = dep.root / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=dep.env)
    try:
        # Generous: a loaded 2-core machine makes Flower's retries slow to give up.
        code = proc.wait(timeout=240)
    finally:
        kill_tree(proc.pid, timeout=5)
    return code, log.read_text(errors="replace")


def test_unregistered_key_and_missing_ca_are_refused(deployment: Deployment) -> None:
    dep = deployment
    keydir = dep.root / "rogue"
    private, public = make_node_keypair()
    write_private(keydir / "rogue.key", private)
    write_public(keydir / "rogue.pub", public)
    ca = dep.root / "consortium" / "sites" / SITES[0] / "tls" / "ca.pem"
    flower_supernode = str(Path(sys.executable).parent / "flower-supernode")
    common = ["--superlink", dep.superlink, "--max-retries", "2", "--max-wait-time", "8"]
    code, out = _run_node(
        dep,
        [flower_supernode, *common, "--port", str(free_port()), "--root-certificates", str(ca),
         "--auth-supernode-private-key", str(keydir / "rogue.key")],
        "rogue",
    )  # fmt: skip
    assert code != 0
    assert "Failed to activate SuperNode" in out
    key = dep.root / "consortium" / "sites" / SITES[0] / "supernode.key"
    code, out = _run_node(
        dep,
        [flower_supernode, *common, "--port", str(free_port()),
         "--auth-supernode-private-key", str(key)],
        "no-ca",
    )  # fmt: skip
    assert code != 0
    out = out.lower()
    assert "certificate" in out or "ssl" in out or "connect" in out, out[-2000:]


def test_failed_run_exits_nonzero(deployment: Deployment) -> None:
    dep = deployment
    exp = write_experiment(
        dep.root, "broken", SITES, rounds=1, extra="\n[strategy]\nname = \"fedavg\"\n"
        "options = { no_such_option = 1 }\n",
    )  # fmt: skip
    res = dep.cli("run", str(exp), "--federation", "test", timeout=120)
    assert res.returncode != 0, res.stdout
    assert "failed" in (res.stdout + res.stderr)


def _events(dep: Deployment, site: str) -> list[tuple[str, str, int]]:
    return [
        (r["event"], r.get("handler", ""), r.get("round", 0))
        for r in read(audit_path(_site_ws(dep, site)))
        if r.get("experiment") == "deploy-e2e"
    ]


def test_site_crash_coordinator_crash_resume(deployment: Deployment) -> None:
    dep = deployment
    name = "deploy-e2e"
    exp = write_experiment(dep.root, name, SITES, rounds=2, round_timeout=30)
    dep.spawn("run", "run", str(exp), "--federation", "test")

    # A site dies in the middle of round 2's training ...
    victim = SITES[2]
    _wait(lambda: _received(dep, victim, "train", 2), 150, f"{victim} training round 2", 0.1)
    dep.kill(f"site-{victim}")
    run_id = _wait(lambda: _mlflow_run(dep, name), 30, "the MLflow run")
    # ... and the round completes with the other two within round_timeout: they evaluate.
    _wait(lambda: _received(dep, SITES[0], "evaluate", 2), 120, "round 2 to complete")
    assert ("sent", "train", 2) not in _events(dep, victim)

    # The coordinator dies mid-run (round 2's evaluation); the site and it restart, and the
    # run resumes from round 1's checkpoint.
    dep.kill("coordinator")
    dep.kill("run")
    dep.start_coordinator()
    dep.start_sites([victim])
    res = dep.cli("run", str(exp), "--federation", "test", "--resume", run_id, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("sent", "train", 2) in _events(dep, victim)  # it rejoined

    import mlflow

    client = mlflow.tracking.MlflowClient(dep.tracking_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, [v.version for v in versions]
    tags = versions[0].tags
    for key in ("sites", "rounds", "strategy", "config_hash", "fedhealth_version", "accuracy"):
        assert tags.get(key), (key, tags)
    assert tags["rounds"] == "2" and tags["sites"] == ",".join(sorted(SITES)), tags
    assert versions[0].run_id == run_id
    steps = sorted(m.step for m in client.get_metric_history(run_id, "global/accuracy"))
    assert set(steps) == {1, 2}, steps
    assert sorted(_checkpoints(dep, run_id))[-1].endswith("round-0002.npz")
    sent = [r for r in read(audit_path(_site_ws(dep, SITES[0]))) if r["event"] == "sent"]
    assert sent and all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in sent)
