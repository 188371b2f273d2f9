"""End to end on a real deployment: coordinator (SuperLink + MLflow server) and three sites
as separate processes on 127.0.0.1 with TLS and SuperNode authentication.

One run, with DP-SGD and encrypted aggregation on, survives a site killed mid-round and a
coordinator killed mid-run (resumed with ``fedhealth run --resume``) and registers exactly
one model version with full provenance.
Also: an unregistered SuperNode key and a client without the consortium CA are refused,
and a failed run makes ``fedhealth run`` exit non-zero.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedhealth.deploy.pki import make_node_keypair, write_private, write_public
from fedhealth.deploy.processes import free_port, kill_tree
from fedhealth.site.audit import audit_path, read
from tests.deploy_harness import (
    SITES,
    Deployment,
    privacy_sections,
    provisioned_consortium,
    wait_for,
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


def _received(dep: Deployment, site: str, handler: str, round_: int) -> bool:
    return any(
        r["event"] == "received" and r.get("handler") == handler and r.get("round") == round_
        for r in read(audit_path(_site_ws(dep, site)))
    )


def _checkpoints(dep: Deployment, run_id: str) -> list[str]:
    import mlflow

    client = mlflow.tracking.MlflowClient(dep.tracking_uri, registry_uri=dep.tracking_uri)
    try:
        return [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    except Exception:  # noqa: BLE001 - server restarting
        return []


def _mlflow_run(dep: Deployment, experiment: str) -> str | None:
    import mlflow

    client = mlflow.tracking.MlflowClient(dep.tracking_uri, registry_uri=dep.tracking_uri)
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


def _he_ledger(dep: Deployment, site: str) -> dict:
    from fedhealth.config.site import load_site
    from fedhealth.site.encrypted_reply import ledger_path

    path = ledger_path(load_site(dep.root / "sites" / f"{site}.toml"))
    return json.loads(path.read_text()) if path.is_file() else {}


def _round_key(ledger: dict, part: str, round_: int) -> str | None:
    """The HE ledger's entry of ``round_`` in ``part`` (contributed/decrypted)."""
    hits = [v for k, v in ledger.get(part, {}).items() if json.loads(k)[1] == round_]
    return hits[0] if hits else None


def test_site_crash_coordinator_crash_resume(deployment: Deployment) -> None:
    """With DP-SGD (ε = 1 per site) and encrypted aggregation on."""
    from fedhealth.config.site import load_site
    from fedhealth.privacy.dp.ledger import PrivacyLedger

    dep = deployment
    name = "deploy-e2e"
    exp = write_experiment(
        dep.root, name, SITES, rounds=2, round_timeout=60, extra=privacy_sections(dep.root)
    )
    dep.spawn("run", "run", str(exp), "--federation", "test")

    # A site dies in the middle of round 1's training ...
    victim, witness = SITES[2], SITES[0]
    wait_for(lambda: _received(dep, victim, "train", 1), 150, f"{victim} training round 1", 0.1)
    dep.kill(f"site-{victim}")
    run_id = wait_for(lambda: _mlflow_run(dep, name), 30, "the MLflow run")
    # ... and the round completes with the other two within round_timeout (the quorum
    # decrypts their sum): they evaluate.
    wait_for(lambda: _received(dep, witness, "evaluate", 1), 240, "round 1 to complete")
    assert ("sent", "train", 1) not in _events(dep, victim)

    # The coordinator dies mid-round 2, after a site sent its encrypted update.
    wait_for(lambda: ("sent", "train", 2) in _events(dep, witness), 120, "a round-2 update", 0.05)
    dep.freeze("coordinator")  # at once: before it can ask a quorum to decrypt round 2
    dep.kill("coordinator")
    dep.kill("run")
    first_token = _round_key(_he_ledger(dep, witness), "contributed", 2)
    assert first_token and _round_key(_he_ledger(dep, witness), "decrypted", 2) is None

    # Coordinator and the dead site restart; the run resumes from round 1's checkpoint and
    # re-runs round 2 under the same HE binding with a fresh nonce, with all three sites.
    dep.start_coordinator()
    dep.start_sites([victim])
    # Generous: on a loaded 2-core machine each deployed round takes seconds.
    res = dep.cli("run", str(exp), "--federation", "test", "--resume", run_id, timeout=480)
    assert res.returncode == 0, res.stdout + res.stderr
    assert ("sent", "train", 2) in _events(dep, victim)  # it rejoined
    ledger = _he_ledger(dep, witness)
    assert _round_key(ledger, "contributed", 2) not in (None, first_token)

    import mlflow

    client = mlflow.tracking.MlflowClient(dep.tracking_uri, registry_uri=dep.tracking_uri)
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 1, [v.version for v in versions]
    tags = versions[0].tags
    for key in ("sites", "rounds", "strategy", "config_hash", "fedhealth_version", "accuracy"):
        assert tags.get(key), (key, tags)
    assert tags["rounds"] == "2" and tags["sites"] == ",".join(sorted(SITES)), tags
    assert tags["he"] == "on" and tags["dp"] == "record", tags
    assert versions[0].run_id == run_id
    steps = sorted(m.step for m in client.get_metric_history(run_id, "global/accuracy"))
    assert steps == [1, 2], steps
    # The cumulative ε is reported after training and again after the noisy release of the
    # evaluation metrics (charged too): up to two points a round, never decreasing.
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run_id, f"site/{witness}/epsilon")
    )
    assert sorted({step for step, _ in history}) == [1, 2], history
    assert [v for _, v in history] == sorted(v for _, v in history), history
    run = client.get_run(run_id)
    assert run.data.params["he.experiment_id"].startswith(f"{name}:{run_id}:")
    assert run.data.tags["fedhealth.resumed"] == "true"
    assert sorted(_checkpoints(dep, run_id))[-1].endswith("round-0002.npz")

    # ε is the accountant's over every step the witness ran, the lost attempts included:
    # its ledger holds four DP-SGD charges - round 1 twice (the victim's drop-out made the
    # cohort-bound round be announced again to the two survivors, who trained again) and
    # round 2 twice (the crashed attempt's update left the site) - beside the charges of its
    # noisy releases (metrics, statistics); the version says that ε, above the planned 1.0.
    from fedhealth.privacy.dp.release import RELEASE_SAMPLE_RATE, RELEASE_STEPS

    profile = load_site(dep.root / "sites" / f"{witness}.toml")
    with PrivacyLedger(profile.ledger_path) as led:
        charges = [e for e in led.entries("breast-cancer") if e.experiment == name]
        spent = led.spent_in_experiment("breast-cancer", name)
    release = (RELEASE_SAMPLE_RATE, RELEASE_STEPS)
    sgd = [e.round for e in charges if (e.sample_rate, e.steps) != release]
    assert sgd == [1, 1, 2, 2], [(e.round, e.sample_rate, e.steps) for e in charges]
    assert spent > 1.0 and spent == max(e.epsilon_experiment_total for e in charges)
    assert float(tags[f"epsilon/{witness}"]) == pytest.approx(spent, rel=1e-3)
    records = list(read(audit_path(_site_ws(dep, witness))))
    sent = [r for r in records if r["event"] == "sent"]
    assert sent and all(len(r["sha256"]) == 64 and r["bytes"] > 0 for r in sent)

    # The audit log links each update to its ledger charge and to the model version.
    from fedhealth.cli.audit_view import ledger_links, model_versions

    links = ledger_links(profile.ledger_path, records)
    trained = [i for i, r in enumerate(records) if r["event"] == "sent" and r["handler"] == "train"]
    assert [records[i]["round"] for i in trained] == [1, 1, 2, 2], [records[i] for i in trained]
    assert {links[i] for i in trained} <= {f"#{e.id}" for e in charges}, links
    assert len({links[i] for i in trained}) == 4, links  # each update its own charge
    assert {records[i]["mlflow_run"] for i in trained} == {run_id}
    assert model_versions(dep.tracking_uri, {run_id}) == {run_id: f"{name} v{versions[0].version}"}
    res = dep.cli(
        "site", "audit", str(dep.root / "sites" / f"{witness}.toml"),
        "--tracking-uri", dep.tracking_uri,
    )  # fmt: skip
    assert res.returncode == 0 and "ledger #" in res.stdout, res.stdout + res.stderr
