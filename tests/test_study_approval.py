"""Study approval bound to a hash (issue 10, item 2): the attacks a coordinator can try.

A site with ``[privacy] approval = "manual"`` serves only studies its operator approved,
identified by a hash of everything that decides what leaves it. Each test drives the real
ClientApp handlers (``dp_consortium.train_round``) or a real simulation, signs decisions
with the real Ed25519 code, and reads the site's real store, ledger and audit log.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from dp_consortium import (
    LocalGrid,
    refusal,
    reply_metrics,
    train_round,
    write_experiment,
    write_site,
)
from typer.testing import CliRunner

from fedhealth.cli.main import app
from fedhealth.config.experiment import load_experiment
from fedhealth.config.site import load_site
from fedhealth.errors import ConfigError, FederationError
from fedhealth.site.approvals import (
    StudyRefused,
    check_round,
    decide,
    list_studies,
    study_status,
)
from fedhealth.site.audit import audit_path, read
from fedhealth.study import study_hash

runner = CliRunner()
DP = {"noise_multiplier": 1.1}


def charges(site: Path) -> int:
    """Ledger entries of a site (0 when it never charged anything)."""
    from fedhealth.privacy.dp.ledger import PrivacyLedger

    path = load_site(site).ledger_path
    if not path.exists():
        return 0
    with PrivacyLedger(path) as ledger:
        return len(ledger.entries())


def events(site: Path, event: str) -> list[dict]:
    path = audit_path(load_site(site).workspace)
    return [r for r in read(path) if r["event"] == event] if path.exists() else []


@pytest.fixture
def manual(tmp_path: Path) -> tuple[Path, Path]:
    """One manual-approval site and a DP experiment over it."""
    site = write_site(tmp_path, "h1", n=80, seed=0, policy={"approval": "manual"})
    return site, write_experiment(tmp_path, [site], min_sites=1, dp=DP)


def the_study(experiment: Path) -> str:
    return study_hash(load_experiment(experiment).task_spec())


# -- the site's gate ---------------------------------------------------------------------------


def test_an_unapproved_study_is_held_for_a_person_and_nothing_is_trained_or_charged(manual):
    site, exp = manual
    reply, _ = train_round(exp, 0, 1)
    ref = refusal(reply)
    study = the_study(exp)
    assert ref["rule"] == "study-pending" and study in ref["message"]
    assert charges(site) == 0 and events(site, "sent") == []
    # The refusal was decided before any data was read or any model built.
    refused = events(site, "refused")[-1]
    assert refused["rule"] == "study-pending"
    assert refused["timing"]["load_s"] == 0 and refused["timing"]["train_s"] == 0
    # The pending request says, for a person, everything the study asks for.
    (record,) = list_studies(load_site(site))
    assert record["study"] == study and record["status"] == "pending"
    asks = record["asks"]
    assert asks["dataset"] == "table" and asks["columns"] == ["a", "b", "c", "d", "e", "y"]
    assert asks["model"]["name"] == "logistic_regression"
    assert asks["strategy"]["name"] == "fedavg" and asks["dp"]["noise_multiplier"] == 1.1
    assert asks["he"] == "off" and asks["training"]["learning_rate"] == 0.2
    assert record["privacy"]["epsilon"] > 0 and record["privacy"]["steps"] > 0
    assert [e["study"] for e in events(site, "study-requested")] == [study]
    # Asking again stores nothing new and is still pending.
    assert refusal(train_round(exp, 0, 1)[0])["rule"] == "study-pending"
    assert len(events(site, "study-requested")) == 1


def test_approve_then_runs_deny_then_declined_without_a_reason(manual):
    site, exp = manual
    profile = load_site(site)
    study = the_study(exp)
    assert refusal(train_round(exp, 0, 1)[0])["rule"] == "study-pending"

    decision = decide(profile, study[:12], "approved", by="Dr. Rivera")
    assert decision.study == study and decision.by == "Dr. Rivera"
    metrics = reply_metrics(train_round(exp, 0, 1)[0])
    assert metrics["epsilon"] > 0 and charges(site) == 1

    decide(profile, study, "declined", by="Dr. Rivera")
    ref = refusal(train_round(exp, 0, 2)[0])
    assert ref["rule"] == "study-declined" and charges(site) == 1
    assert "Rivera" not in ref["message"]  # the coordinator learns the decision, nothing more
    logged = [(e["event"], e["by"]) for e in events(site, "study-approved")] + [
        (e["event"], e["by"]) for e in events(site, "study-declined")
    ]
    assert logged == [("study-approved", "Dr. Rivera"), ("study-declined", "Dr. Rivera")]
    assert all(e["signature"] and e["study"] == study for e in events(site, "study-declined"))


def test_a_changed_study_after_approval_is_pending_again(manual, tmp_path):
    site, exp = manual
    decide(load_site(site), the_study(exp), "approved", by="op")
    reply_metrics(train_round(exp, 0, 1)[0])
    # The coordinator quietly lowers the noise: a different study.
    changed = write_experiment(
        tmp_path, [site], min_sites=1, dp={"noise_multiplier": 0.5}, filename="changed.toml"
    )
    assert the_study(changed) != the_study(exp)
    before = charges(site)
    ref = refusal(train_round(changed, 0, 2)[0])
    assert ref["rule"] == "study-pending" and charges(site) == before
    # Any field: more rounds, another learning rate, another model option.
    base = load_experiment(exp).task_spec()
    for update in (
        {"rounds": 7},
        {"training": base.training.model_copy(update={"learning_rate": 0.3})},
        {"seed": 2},
    ):
        assert study_hash(base.model_copy(update=update)) != study_hash(base)


def test_a_forged_or_tampered_decision_counts_as_none(manual, tmp_path):
    from fedhealth.privacy.he.keys import b64e, generate_identity, sign
    from fedhealth.site.approvals import Decision

    site, exp = manual
    profile = load_site(site)
    study = the_study(exp)
    assert refusal(train_round(exp, 0, 1)[0])["rule"] == "study-pending"
    path = profile.workspace / "studies" / f"{study}.decision.json"

    # 1. An approval signed by someone else's key (claiming it as the signer).
    mallory = generate_identity("h1")
    forged = Decision(study, "h1", "approved", "mallory", "2030-01-01T00:00:00+00:00",
                      signer=b64e(mallory.signing_public))  # fmt: skip
    forged = Decision(
        **{**forged.__dict__, "signature": b64e(sign(mallory, forged.signed_bytes()))}
    )
    path.write_text(json.dumps(forged.__dict__))
    assert study_status(profile, study)[0] == "pending"
    assert refusal(train_round(exp, 0, 1)[0])["rule"] == "study-pending" and charges(site) == 0

    # 2. A real decline, edited into an approval.
    decide(profile, study, "declined", by="op")
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"decision": "approved"}))
    assert study_status(profile, study)[0] == "pending"
    (record,) = list_studies(profile)
    assert "invalid signature" in record["decision_problem"]
    assert refusal(train_round(exp, 0, 1)[0])["rule"] == "study-pending" and charges(site) == 0

    # 3. A signed approval of another study copied over this one.
    other = "0" * 64
    decide(profile, other, "approved", by="op")
    path.write_text((profile.workspace / "studies" / f"{other}.decision.json").read_text())
    assert study_status(profile, study)[0] == "pending"


def test_pinned_hashes_run_and_rules_mode_needs_no_person(tmp_path):
    loose = write_site(tmp_path, "h2", n=80, seed=1)  # the default: approval = "rules"
    exp = write_experiment(tmp_path, [loose], min_sites=1, name="rules-study")
    reply_metrics(train_round(exp, 0, 1)[0])
    pinned = write_site(
        tmp_path, "h3", n=80, seed=2,
        policy={"approval": "manual", "approved_studies": [the_study(exp)]},
    )  # fmt: skip
    exp3 = write_experiment(tmp_path, [pinned], min_sites=1, name="rules-study",
                            filename="pinned.toml")  # fmt: skip
    assert the_study(exp3) == the_study(exp)  # the hash does not depend on who runs it
    reply_metrics(train_round(exp3, 0, 1)[0])
    with pytest.raises(ConfigError, match=r"`privacy.approved_studies`: 'abc' is not a study hash"):
        write_site(tmp_path, "h4", n=10, seed=3, policy={"approved_studies": ["abc"]})
        load_site(tmp_path / "h4.toml")


def test_a_custom_strategy_is_hashed_by_its_code(tmp_path, root):
    site = write_site(tmp_path, "h1", n=40, seed=0)
    source = (root / "strategies" / "balanced_fedavg.py").read_text()
    mine = tmp_path / "mine.py"
    mine.write_text(source)
    exp = write_experiment(tmp_path, [site], min_sites=1, strategy=f"{mine}:BalancedFedAvg")
    spec = load_experiment(exp).task_spec()
    assert spec.strategy.name == "mine.py:BalancedFedAvg"
    assert len(spec.strategy.code_sha256) == 64
    before = study_hash(spec)
    mine.write_text(source + "\n# a quiet change\n")
    assert study_hash(load_experiment(exp).task_spec()) != before


def test_an_encrypted_round_must_announce_the_studys_parameters(manual):
    from fedhealth.protocol import HERound, HESpec

    site, exp = manual
    profile = load_site(site)
    spec = (
        load_experiment(exp)
        .task_spec()
        .model_copy(
            update={"he": HESpec(weight_scale=1000.0, quorum=2, bind_cohort=True, min_sites=2)}
        )
    )
    good = HERound("x:r:1", 1, "n", 1000.0, "num-examples", 2, ("h1", "h2"))
    check_round(profile, spec, good)
    for bad in (
        None,
        HERound("x:r:1", 1, "n", 1e9, "num-examples", 2, ("h1", "h2")),
        HERound("x:r:1", 1, "n", 1000.0, "num-examples", 1, ("h1", "h2")),
        HERound("x:r:1", 1, "n", 1000.0, "num-examples", 2, None),
    ):
        with pytest.raises(StudyRefused) as err:
            check_round(profile, spec, bad)
        assert err.value.rule == "study-mismatch"


# -- the operator's commands -------------------------------------------------------------------


def test_site_requests_approve_and_deny_commands(manual):
    site, exp = manual
    train_round(exp, 0, 1)
    study = the_study(exp)
    out = runner.invoke(app, ["site", "requests", str(site)], terminal_width=200)
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert f"pending study {study}" in text and "columns a, b, c, d, e, y" in text
    assert "noise_multiplier=1.1" in text and "projected ε" in text
    out = runner.invoke(app, ["site", "approve", str(site), study[:10], "--by", "Ana"])
    assert out.exit_code == 0 and "approved by Ana" in " ".join(out.output.split())
    out = runner.invoke(app, ["site", "requests", str(site), "--all"], terminal_width=200)
    assert "approved by Ana" in " ".join(out.output.split())
    out = runner.invoke(app, ["site", "deny", str(site), "1234"])
    assert out.exit_code == ConfigError.exit_code and "not a study hash" in out.output


# -- the coordinator ---------------------------------------------------------------------------


@pytest.fixture
def three(tmp_path: Path):
    sites = [
        write_site(tmp_path, "h1", n=80, seed=0),
        write_site(tmp_path, "h2", n=80, seed=1),
        write_site(tmp_path, "h3", n=80, seed=2, policy={"approval": "manual"}),
    ]
    return tmp_path, sites


def _federation(exp: Path):
    """The real coordinator round loop, recording to a real MLflow SQLite store."""
    from fedhealth.coordinator.federation import Federation

    return Federation(load_experiment(exp), f"sqlite:///{exp.parent / 'mlflow.db'}")


def test_the_coordinator_goes_on_with_approved_sites_and_names_the_pending_one(three, monkeypatch):
    root, sites = three
    exp = write_experiment(root, sites, rounds=2, min_sites=2)
    summary = _federation(exp).run(LocalGrid(exp))
    assert set(summary.site_metrics) == {"h1", "h2"}
    pending = [r for r in summary.refusals if r.rule == "study-pending"]
    assert [r.site for r in pending] == ["h3"] and the_study(exp) in pending[0].message
    # Asked before the run and again at each round's start; never sent training.
    asked = [(e["handler"], e["rule"]) for e in events(sites[2], "refused")]
    assert events(sites[2], "sent") == [] and asked == [("study", "study-pending")] * 3


def test_the_coordinator_fails_naming_pending_sites_below_min_sites(three, monkeypatch):
    root, sites = three
    exp = write_experiment(root, sites, rounds=1, min_sites=3)
    with pytest.raises(FederationError, match=r"only 2 site\(s\) approved.*study-pending: h3"):
        _federation(exp).run(LocalGrid(exp))
    assert events(sites[0], "sent")[-1]["handler"] == "study"  # nobody trained


def test_the_coordinator_waits_for_an_approval_within_its_bound(three, monkeypatch):
    import fedhealth.coordinator.approvals as gate

    root, sites = three
    exp = write_experiment(root, sites, rounds=1, min_sites=3)
    text = exp.read_text().replace("min_sites = 3", "min_sites = 3\napproval_timeout = 60.0")
    exp.write_text(text)
    monkeypatch.setattr(gate, "POLL_SECONDS", 0.1)

    def operator() -> None:  # approves once the request is there
        profile = load_site(sites[2])
        for _ in range(300):
            if list_studies(profile):
                decide(profile, the_study(exp), "approved", by="op")
                return
            time.sleep(0.05)

    thread = threading.Thread(target=operator)
    thread.start()
    summary = _federation(exp).run(LocalGrid(exp))
    thread.join()
    assert set(summary.site_metrics) == {"h1", "h2", "h3"}
    assert [r.rule for r in summary.refusals if r.rule.startswith("study")] == ["study-pending"]


@pytest.mark.slow
def test_in_simulation_a_pending_site_stops_the_run_and_after_approval_it_proceeds(three):
    root, sites = three
    exp = write_experiment(root, sites, rounds=1, min_sites=3)
    result = runner.invoke(app, ["run", str(exp)], terminal_width=200)
    out = " ".join(result.output.split())
    assert result.exit_code == FederationError.exit_code, result.output
    assert "study-pending: h3" in out
    (record,) = list_studies(load_site(sites[2]))
    out = runner.invoke(app, ["site", "approve", str(sites[2]), record["study"], "--by", "op"])
    assert out.exit_code == 0, out.output
    result = runner.invoke(app, ["run", str(exp)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert [e["handler"] for e in events(sites[2], "sent")][-2:] == ["train", "evaluate"]
    assert events(sites[2], "sent")[-2]["bytes"] > 0
