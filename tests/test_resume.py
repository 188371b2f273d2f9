"""A coordinator killed mid-run resumes with ``fedhealth run --resume RUN_ID``.

The simulation here (the deployed variant is in test_deploy_e2e.py) runs the quickstart
with DP-SGD and encrypted aggregation on, is killed with SIGKILL in round 3's training, and resumes:
the global model, the strategy, each site's reported ε and the HE binding come back from
the checkpoint, and exactly one model version is registered.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedhealth.config.experiment import load_experiment
from fedhealth.coordinator.privacy_report import PrivacyReport
from fedhealth.deploy.processes import kill_tree
from fedhealth.site.audit import read

FEDHEALTH = str(Path(sys.executable).parent / "fedhealth")
ROOT = Path(__file__).resolve().parents[1]


def _site_level_cfg(tmp_path: Path):
    text = (ROOT / "experiments" / "quickstart.toml").read_text()
    text = re.sub(r"\[privacy\.dp\].*?(?=\n\[)", "", text, flags=re.S)
    text += (
        '\n[privacy.dp]\nenabled = true\nmode = "site"\nsite_noise_multiplier = 1.0\n'
        "clip_norm = 1.0\ndelta = 1e-3\nexpected_sites = 3\n"
    )
    path = tmp_path / "experiments" / "q.toml"
    shutil.copytree(ROOT / "experiments", path.parent)
    shutil.copytree(ROOT / "sites", tmp_path / "sites")
    path.write_text(text)
    return load_experiment(path)


def test_privacy_report_state_survives_json(tmp_path) -> None:
    """Each site's reported spend and the site-level history round-trip through a
    checkpoint's JSON header; the site-level ε is recomputed by the accountant."""
    cfg = _site_level_cfg(tmp_path)
    report = PrivacyReport(cfg)
    report.sites = {"st-olav": {"epsilon": 0.4, "dp-steps": 12, "rounds": 2}}
    report.site_level_history = [(1.0, 1.0, 1), (1.2247, 1.0, 1)]
    restored = PrivacyReport(cfg)
    restored.load_state_dict(json.loads(json.dumps(report.state_dict())))
    assert restored.sites == report.sites
    assert restored.site_level_history == report.site_level_history
    assert restored.site_level_epsilon is not None and restored.site_level_epsilon > 0
    more = PrivacyReport(cfg)
    more.load_state_dict({"sites": {}, "site_level_history": [[1.0, 1.0, 1]]})
    assert more.site_level_epsilon < restored.site_level_epsilon  # fewer rounds, less ε


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The reference configs and the quickstart's demo data and keys in a fresh folder."""
    for folder in ("experiments", "sites", "strategies"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    res = subprocess.run([FEDHEALTH, "demo-data"], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return tmp_path


def _training_started(project: Path, round_: int) -> bool:
    """Whether any site's audit log shows it received round ``round_``'s training."""
    return any(
        r["event"] == "received" and r.get("handler") == "train" and r.get("round") == round_
        for log in (project / "workspace" / "sites").glob("*/audit.log")
        for r in read(log)
    )


@pytest.mark.slow
def test_simulation_killed_mid_run_resumes_with_privacy_state(project: Path) -> None:
    import mlflow

    env = dict(os.environ, COLUMNS="200")
    exp = "experiments/quickstart.toml"
    out = (project / "run.out").open("wb")
    proc = subprocess.Popen(
        [FEDHEALTH, "run", exp], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    store = project / "workspace" / "mlflow"
    deadline = time.time() + 240
    while not _training_started(project, 3):
        assert proc.poll() is None, (project / "run.out").read_text()[-3000:]
        assert time.time() < deadline, "round 3 never started"
        time.sleep(0.02)
    # Freeze the coordinator at once (the sites' DP-SGD takes far longer than this), so the
    # crash lands inside round 3's training, before any decryption; then kill everything.
    os.kill(proc.pid, signal.SIGSTOP)
    kill_tree(proc.pid, timeout=10, sig=signal.SIGKILL)
    proc.wait(timeout=30)
    out.close()

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri, registry_uri=uri)
    cfg = load_experiment(project / exp)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id])
    run_id = run.info.run_id
    names = sorted(p.name for p in store.glob("artifacts/**/checkpoints/*"))
    assert "round-0002.eval.json" in names and not any("0003" in n for n in names), names
    he_binding = run.data.params["he.experiment_id"]
    assert not client.search_model_versions(f"name = '{cfg.registered_model}'")

    res = subprocess.run(
        [FEDHEALTH, "run", exp, "--resume", run_id], cwd=project, env=env,
        capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resuming MLflow run {run_id}" in res.stdout

    rounds = cfg.experiment.rounds
    (version,) = client.search_model_versions(f"name = '{cfg.registered_model}'")
    assert version.run_id == run_id
    run = client.get_run(run_id)
    assert run.data.params["he.experiment_id"] == he_binding  # same binding after the crash
    assert run.data.tags["fedhealth.resumed"] == "true"
    steps = {m.step for m in client.get_metric_history(run_id, "global/accuracy")}
    assert steps == set(range(1, rounds + 1)), steps
    # The privacy report was restored: every site is credited with all its rounds (a report
    # rebuilt after the crash would count only the resumed ones) ...
    card = version.description
    for site in ("st-olav", "karolinska", "charite"):
        row = next(line for line in card.splitlines() if line.startswith(f"| {site} |"))
        assert row.split("|")[6].strip() == str(rounds), row
    # ... and so was the HE bookkeeping: the card lists every round's contributors.
    he_rows = [line for line in card.splitlines() if re.match(r"\| \d+ \| .* \| .* \|$", line)]
    assert [int(line.split("|")[1]) for line in he_rows] == list(range(1, rounds + 1)), card
    assert f"Round binding `{he_binding}`" in card
