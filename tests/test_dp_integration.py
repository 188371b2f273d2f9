"""Differential privacy wired through the federation: what sites report, refuse and record.

The fast tests drive the site exactly as Flower does (the ClientApp's ``train`` handler
in this process, see ``tests/dp_consortium.py``); the slow ones run whole federations on
Flower's simulation engine and read MLflow.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
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
from fedhealth.config.experiment import load_experiment_with_sites
from fedhealth.errors import ConfigError
from fedhealth.privacy.dp.ledger import PrivacyLedger
from fedhealth.privacy.dp.local import sample_rate, steps_per_epoch
from fedhealth.site.dataset import load_site_data

dp_accounting = pytest.importorskip("dp_accounting")
from dp_accounting.pld import PLDAccountant  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402

logging.getLogger("absl").setLevel(logging.ERROR)
runner = CliRunner()


def google_epsilon(history, delta: float, accountant: str) -> float:
    """ε by Google's dp_accounting (RDP, or PLD for our PRV) over (σ, q, steps) phases."""
    if accountant == "rdp":
        acc = RdpAccountant()
    else:
        acc = PLDAccountant(value_discretization_interval=1e-3)
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(event, int(steps))
    return acc.get_epsilon(delta)


def n_train(experiment: Path, site_index: int) -> int:
    cfg, sites = load_experiment_with_sites(experiment)
    return load_site_data(sites[site_index], cfg.task_spec().task).n_train


# -- ε a site reports == an independent computation over the same (q, σ, steps) ------------

SETTINGS = [
    # (dp section, training section, rounds)
    ({"noise_multiplier": 1.1, "accountant": "rdp"}, {"batch_size": 8, "local_epochs": 2}, 3),
    ({"target_epsilon": 2.0, "accountant": "rdp"}, {"batch_size": 16, "max_steps": 5}, 4),
    # A fixed 13 steps a round: more than one pass over the Poisson loader, every step counted.
    ({"target_epsilon": 2.0, "accountant": "rdp"}, {"batch_size": 16, "local_steps": 13}, 3),
    ({"noise_multiplier": 0.9, "accountant": "prv"}, {"batch_size": 32}, 2),
    # q = 1/112: a third of the Poisson batches are empty, and every one is a step.
    ({"noise_multiplier": 1.0, "grad_sample_mode": "hooks"}, {"batch_size": 1}, 1),
]


@pytest.mark.parametrize(("dp", "training", "rounds"), SETTINGS)
def test_reported_epsilon_matches_dp_accounting(tmp_path, dp, training, rounds):
    site = write_site(tmp_path, "h1", n=150, seed=0)
    exp = write_experiment(tmp_path, [site], rounds=rounds, min_sites=1, training=training, dp=dp)
    n = n_train(exp, 0)
    q = sample_rate(n, training["batch_size"])
    per_round = steps_per_epoch(n, training["batch_size"]) * training.get("local_epochs", 1)
    per_round = min(per_round, training.get("max_steps") or per_round)
    per_round = training.get("local_steps") or per_round
    arrays, history = None, []
    for r in range(1, rounds + 1):
        reply, arrays = train_round(exp, 0, r, arrays)
        m = reply_metrics(reply)
        # The site charges what it ran: every step, at the loader's own sampling rate.
        assert m["dp-steps"] == per_round
        assert m["sample-rate"] == pytest.approx(q, rel=1e-12)
        history.append((m["noise-multiplier"], m["sample-rate"], int(m["dp-steps"])))
        ref = google_epsilon(history, 1e-3, dp.get("accountant", "rdp"))
        assert m["epsilon"] == pytest.approx(ref, rel=0.01), (r, m["epsilon"], ref)
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    if "target_epsilon" in dp:  # calibrated over the plan, every planned step counted
        assert dp["target_epsilon"] * 0.98 <= m["epsilon"] <= dp["target_epsilon"]


def test_ledger_holds_each_round_and_resumes_the_experiment(tmp_path):
    site = write_site(tmp_path, "h1", n=120, seed=1)
    exp = write_experiment(tmp_path, [site], rounds=3, min_sites=1, dp={"noise_multiplier": 1.0})
    totals = []
    for r in (1, 2, 3):
        totals.append(reply_metrics(train_round(exp, 0, r)[0])["epsilon"])
    assert totals == sorted(totals) and totals[0] > 0
    with PrivacyLedger(tmp_path / "workspace" / "h1" / "privacy-ledger.sqlite") as ledger:
        entries = ledger.entries()
        assert [e.round for e in entries] == [1, 2, 3]
        assert [e.epsilon_experiment_total for e in entries] == pytest.approx(totals)
    # A rerun of the same experiment composes with its earlier runs: ε only grows.
    again = reply_metrics(train_round(exp, 0, 1)[0])["epsilon"]
    assert again > totals[-1]


# -- policy refusals ----------------------------------------------------------------------


def test_lifetime_budget_refusal_names_site_cap_and_projection_and_keeps_the_ledger(tmp_path):
    site = write_site(tmp_path, "h1", n=120, seed=2, policy={"lifetime_epsilon_budget": 1.5})
    old = write_experiment(
        tmp_path, [site], name="old-study", rounds=1, min_sites=1, dp={"noise_multiplier": 3.0}
    )
    spent = reply_metrics(train_round(old, 0, 1)[0])["epsilon"]
    assert 0 < spent < 1.5
    ledger_path = tmp_path / "workspace" / "h1" / "privacy-ledger.sqlite"
    with PrivacyLedger(ledger_path) as ledger:
        before = [(e.id, e.hash) for e in ledger.entries()]
    new = write_experiment(
        tmp_path, [site], name="new-study", rounds=2, min_sites=1, dp={"noise_multiplier": 1.0}
    )
    reason = refusal(train_round(new, 0, 1)[0])
    assert reason["site"] == "h1" and reason["rule"] == "lifetime_epsilon_budget"
    msg = reason["message"]
    assert "'h1'" in msg and "1.5" in msg and f"{spent:.4g}" in msg and "bring it to" in msg
    with PrivacyLedger(ledger_path) as ledger:  # opens cleanly; nothing lost or added
        assert [(e.id, e.hash) for e in ledger.entries()] == before


@pytest.mark.parametrize(
    ("policy", "dp", "rule"),
    [
        ({"require_dp": True}, None, "require_dp"),
        ({"max_epsilon_per_experiment": 5.0}, None, "max_epsilon_per_experiment"),
        ({"min_noise_multiplier": 2.0}, {"noise_multiplier": 1.0}, "min_noise_multiplier"),
        ({"max_delta": 1e-4}, {"noise_multiplier": 1.0}, "max_delta"),
        ({"allowed_models": ["mlp"]}, {"noise_multiplier": 1.0}, "allowed_models"),
    ],
)
def test_policy_rules_refuse_before_training(tmp_path, policy, dp, rule):
    site = write_site(tmp_path, "h1", n=80, seed=3, policy=policy)
    exp = write_experiment(tmp_path, [site], rounds=1, min_sites=1, dp=dp)
    assert refusal(train_round(exp, 0, 1)[0])["rule"] == rule
    assert not (tmp_path / "workspace" / "h1" / "dp-noise.key").exists()  # nothing trained


def test_exempt_dataset_trains_without_dp_under_a_strict_policy(tmp_path):
    policy = {"require_dp": True, "lifetime_epsilon_budget": 1.0, "exempt_datasets": ["table"]}
    site = write_site(tmp_path, "h1", n=80, seed=4, policy=policy)
    exp = write_experiment(tmp_path, [site], rounds=1, min_sites=1)
    assert "epsilon" not in reply_metrics(train_round(exp, 0, 1)[0])


def test_fedprox_with_dp_is_refused_at_config_time(tmp_path):
    site = write_site(tmp_path, "h1", n=80, seed=5)
    exp = write_experiment(
        tmp_path, [site], rounds=1, min_sites=1, strategy="fedprox", dp={"noise_multiplier": 1.0}
    )
    with pytest.raises(ConfigError, match="FedProx"):
        load_experiment_with_sites(exp)


def test_statistics_and_evaluation_follow_the_policy(tmp_path):
    from fedhealth.config.experiment import load_experiment
    from fedhealth.config.site import load_site
    from fedhealth.errors import PolicyError
    from fedhealth.protocol import RoundConfig
    from fedhealth.site.runtime import SiteRequest, SiteRuntime

    site = write_site(tmp_path, "h1", 80, 14, policy={"share_statistics": False})
    exp = write_experiment(tmp_path, [site], rounds=1, min_sites=1, dp={"noise_multiplier": 1.0})
    cfg, profile = load_experiment(exp), load_site(site)
    request = SiteRequest(RoundConfig(cfg.task_spec(), server_round=0))
    with pytest.raises(PolicyError, match="share_statistics") as err:
        SiteRuntime(profile, request).moments()
    assert err.value.rule == "share_statistics"
    other = write_experiment(tmp_path, [site], name="other", rounds=1, min_sites=1)
    closed = load_site(write_site(tmp_path, "h2", 80, 15, policy={"allowed_experiments": ["x*"]}))
    request = SiteRequest(RoundConfig(load_experiment(other).task_spec(), server_round=1))
    with pytest.raises(PolicyError, match="allowed experiments") as err:
        SiteRuntime(closed, request)  # refused before its data is even read
    assert err.value.rule == "allowed_experiments"


def test_site_level_mode_needs_a_plain_mean_strategy_and_resolves_expected_sites(tmp_path):
    from fedhealth.coordinator.strategies import build_strategy

    sites = [write_site(tmp_path, f"h{i}", 60, i) for i in range(3)]
    dp = {"mode": "site", "clip_norm": 1.0, "site_noise_multiplier": 1.0, "delta": 0.01}
    cfg, _ = load_experiment_with_sites(write_experiment(tmp_path, sites, rounds=1, dp=dp))
    assert cfg.dp_spec().expected_sites == 3
    assert build_strategy(cfg).weighted_by_key == "site-weight"  # every site weighs 1
    exp = write_experiment(tmp_path, sites, rounds=1, dp=dp, strategy="fedmedian")
    with pytest.raises(ConfigError, match="plain mean"):
        build_strategy(load_experiment_with_sites(exp)[0])
    exp = write_experiment(tmp_path, sites, rounds=1, dp=dp | {"delta": 0.5})
    with pytest.raises(ConfigError, match=r"below 1/3"):
        load_experiment_with_sites(exp)


# -- impossible plans fail before training -------------------------------------------------


def test_preflight_names_the_site_for_which_delta_is_not_below_one_over_n(tmp_path):
    from fedhealth.cli.run_cmd import preflight

    small, big = write_site(tmp_path, "small", 40, 7), write_site(tmp_path, "big", 400, 6)
    exp = write_experiment(
        tmp_path, [small, big], rounds=2, dp={"noise_multiplier": 1.0, "delta": 0.01}
    )
    with pytest.raises(ConfigError, match=r"site 'big'.*n=300.*1/n") as err:
        preflight(*load_experiment_with_sites(exp))
    assert "privacy.dp.delta" in str(err.value)


def test_preflight_states_the_smallest_feasible_epsilon(tmp_path):
    from fedhealth.cli.run_cmd import preflight

    site = write_site(tmp_path, "h1", 100, 8)
    exp = write_experiment(
        tmp_path,
        [site],
        rounds=200,
        min_sites=1,
        training={"batch_size": 64, "local_epochs": 5},
        dp={"target_epsilon": 0.01},
    )
    with pytest.raises(ConfigError) as err:
        preflight(*load_experiment_with_sites(exp))
    msg = str(err.value)
    assert "privacy.dp.target_epsilon" in msg and "site 'h1'" in msg
    assert "smallest feasible ε" in msg and "experiment.rounds" in msg


def test_config_needs_exactly_one_noise_setting(tmp_path):
    site = write_site(tmp_path, "h1", 80, 9)
    for dp in ({}, {"noise_multiplier": 1.0, "target_epsilon": 1.0}):
        exp = write_experiment(tmp_path, [site], rounds=1, min_sites=1, dp=dp)
        with pytest.raises(ConfigError, match=r"privacy\.dp.*exactly one"):
            load_experiment_with_sites(exp)
    exp = write_experiment(
        tmp_path, [site], rounds=1, min_sites=1, dp={"mode": "site", "clip_norm": 1.0}
    )
    with pytest.raises(ConfigError, match="site_noise_multiplier"):
        load_experiment_with_sites(exp)


# -- site-level DP and the secret noise ----------------------------------------------------


def test_site_level_shares_sum_to_the_calibrated_noise(tmp_path):
    """k sites each add a share; the sum's noise has std σ·C (checked statistically)."""
    from fedhealth.config.site import load_site
    from fedhealth.protocol import TaskSpec
    from fedhealth.site.privacy_guard import PrivacyGuard

    sigma, clip, k, dim = 1.3, 0.5, 4, 40_000
    spec = TaskSpec(
        experiment="exp",
        task={"dataset": "table", "kind": "tabular", "schema": {"numeric": ["a"], "label": "y"}},
        model={"name": "logistic_regression"},
        training={},
        seed=0,
        rounds=1,
        dp={
            "enabled": True,
            "mode": "site",
            "clip_norm": clip,
            "site_noise_multiplier": sigma,
            "expected_sites": k,
        },
    )
    old = {"w": np.zeros(dim, dtype=np.float32)}
    new = {"w": np.full(dim, 10.0, dtype=np.float32)}  # norm far above C: clipped to C
    total = np.zeros(dim)
    for i in range(k):
        profile = load_site(write_site(tmp_path, f"s{i}", 20, i))
        guard = PrivacyGuard(profile, "exp", 1, spec)
        out = guard.privatise_update(new, old, {"site": profile.name, "round": 1})
        total += out["w"].astype(np.float64)
    signal = k * clip / math.sqrt(dim)  # each clipped update is C/sqrt(dim) per coordinate
    noise = total - signal
    assert abs(noise.mean()) < 4 * sigma * clip / math.sqrt(dim)
    assert noise.std() == pytest.approx(sigma * clip, rel=0.03)


def test_dp_updates_are_reproducible_at_a_site_and_unpredictable_without_its_key(tmp_path):
    site = write_site(tmp_path, "h1", n=100, seed=10)
    exp = write_experiment(tmp_path, [site], rounds=2, min_sites=1, dp={"noise_multiplier": 1.0})

    def update():
        reply = train_round(exp, 0, 1)[0]
        return {k: v.numpy().copy() for k, v in reply.content["arrays"].items()}

    a, b = update(), update()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same key, same inputs
    (tmp_path / "workspace" / "h1" / "dp-noise.key").unlink()
    c = update()
    assert not all(np.array_equal(a[k], c[k]) for k in a)  # the public seed is not enough


# -- the site ledger CLI -------------------------------------------------------------------


def test_site_ledger_cli_prints_spend_against_caps(tmp_path):
    policy = {"max_epsilon_per_experiment": 9.0, "lifetime_epsilon_budget": 20.0}
    site = write_site(tmp_path, "h1", n=100, seed=11, policy=policy)
    result = runner.invoke(app, ["site", "ledger", str(site)])
    assert result.exit_code == 0, result.output
    assert "no privacy ledger yet" in result.output
    exp = write_experiment(tmp_path, [site], rounds=2, min_sites=1, dp={"noise_multiplier": 1.0})
    eps = reply_metrics(train_round(exp, 0, 1)[0])["epsilon"]
    result = runner.invoke(app, ["site", "ledger", str(site), "--entries"], terminal_width=160)
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "dataset table: lifetime ε" in out and "budget 20" in out
    assert "dp-study" in out and f"{eps:.4g}" in out and "hash chain verified" in out


def test_site_ledger_cli_reports_a_corrupt_ledger_without_traceback(tmp_path):
    site = write_site(tmp_path, "h1", n=100, seed=12)
    ledger = tmp_path / "workspace" / "h1" / "privacy-ledger.sqlite"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"this is not a database" * 100)
    result = runner.invoke(app, ["site", "ledger", str(site)])
    assert result.exit_code != 0
    assert "privacy ledger" in result.output and "Traceback" not in result.output


# -- whole federations on Flower's simulation engine ---------------------------------------


@pytest.fixture
def consortium(tmp_path):
    """Three sites; h3 has nearly used up its lifetime budget in an earlier experiment."""
    sites = [
        write_site(tmp_path, "h1", 160, 20),
        write_site(tmp_path, "h2", 120, 21),
        write_site(tmp_path, "h3", 100, 22, policy={"lifetime_epsilon_budget": 1.2}),
    ]
    earlier = write_experiment(
        tmp_path, [sites[2]], name="earlier", rounds=1, min_sites=1, dp={"noise_multiplier": 3.0}
    )
    reply_metrics(train_round(earlier, 0, 1)[0])
    old = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path, sites
    os.chdir(old)


def test_preflight_warns_which_site_will_refuse_and_from_which_round(consortium):
    from fedhealth.cli.privacy_preflight import privacy_outlook
    from fedhealth.privacy.dp.accounting import epsilon_spent

    root, sites = consortium
    exp = write_experiment(root, sites, rounds=8, dp={"noise_multiplier": 3.0})
    cfg, profiles = load_experiment_with_sites(exp)
    sizes = {p.name: n_train(exp, i) for i, p in enumerate(profiles)}
    outlook = {o.site: o for o in privacy_outlook(cfg, profiles, sizes)}
    assert outlook["h1"].refusal is None and outlook["h2"].refusal is None
    with PrivacyLedger(root / "workspace" / "h3" / "privacy-ledger.sqlite") as ledger:
        spent = ledger.spent("table")
    q, per_round = sample_rate(75, 16), steps_per_epoch(75, 16)
    first = next(r for r in range(1, 9) if spent + epsilon_spent(3.0, q, r * per_round, 1e-3) > 1.2)
    assert 1 < first <= 8
    assert f"site 'h3' refuses round {first} of experiment 'dp-study'" in outlook["h3"].refusal


@pytest.mark.slow
def test_federation_continues_without_a_refusing_site_and_logs_epsilon(consortium):
    import mlflow

    root, sites = consortium
    exp = write_experiment(
        root,
        sites,
        rounds=2,
        min_sites=2,
        training={"batch_size": 16, "local_epochs": 2},
        dp={"noise_multiplier": 1.2, "accountant": "rdp"},
    )
    result = runner.invoke(app, ["run", str(exp)], terminal_width=200)
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output
    assert "site h3 refused (lifetime_epsilon_budget) in rounds 1, 2" in out
    uri = f"sqlite:///{root / 'workspace' / 'mlflow' / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    mv = client.get_model_version("dp-study", "1")
    assert mv.tags["dp"] == "record" and mv.tags["dp_accountant"] == "rdp"
    assert mv.tags["dp_delta"] == "0.001" and "epsilon/h3" not in mv.tags
    assert "## Differential privacy" in mv.description
    for i, name in enumerate(("h1", "h2")):
        n = n_train(exp, i)
        steps = [m.value for m in client.get_metric_history(mv.run_id, f"site/{name}/dp-steps")]
        eps = [m.value for m in client.get_metric_history(mv.run_id, f"site/{name}/epsilon")]
        assert steps == [2 * steps_per_epoch(n, 16)] * 2
        ref = google_epsilon([(1.2, sample_rate(n, 16), int(sum(steps)))], 1e-3, "rdp")
        assert eps[-1] == pytest.approx(ref, rel=0.01)
        assert mv.tags[f"epsilon/{name}"] == f"{eps[-1]:.4g}"
        assert f"{eps[-1]:.4g}" in out  # the closing table's ε column


class _NoMlflow:
    """Stands in for the MLflow recorder where a test is about the round loop only."""

    run_id = "test"

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def test_federation_stops_cleanly_naming_the_refusing_site_when_min_sites_fails(
    consortium, monkeypatch
):
    from fedhealth.coordinator import federation
    from fedhealth.errors import FederationError

    monkeypatch.setattr(federation, "RunRecorder", _NoMlflow)
    root, sites = consortium
    ledger = root / "workspace" / "h3" / "privacy-ledger.sqlite"
    with PrivacyLedger(ledger) as led:
        before = [(e.id, e.hash) for e in led.entries()]
    exp = write_experiment(root, sites, rounds=2, min_sites=3, dp={"noise_multiplier": 1.0})
    cfg, _ = load_experiment_with_sites(exp)
    events = []
    with pytest.raises(FederationError) as err:
        federation.Federation(cfg, "unused", on_event=events.append).run(LocalGrid(exp))
    msg = str(err.value)
    assert "round 1 (training)" in msg and "min_sites is 3" in msg and "'h3'" in msg
    assert "lifetime ε budget" in msg and "is 1.2" in msg and "bring it to" in msg
    assert [e.data["error"] for e in events if e.kind == "run-failed"] == [msg]
    with PrivacyLedger(ledger) as led:  # h3's earlier spend is intact
        assert [(e.id, e.hash) for e in led.entries()] == before


def test_cli_turns_a_failed_run_into_one_message(tmp_path, monkeypatch):
    from fedhealth.engines import simulation
    from fedhealth.errors import FederationError

    site = write_site(tmp_path, "h1", 80, 13)
    exp = write_experiment(tmp_path, [site], rounds=1, min_sites=1, dp={"noise_multiplier": 1.0})
    failure = "round 1 (training): only 0 site(s) answered but min_sites is 1. h1: refused"

    def fail(*args, **kwargs):
        raise FederationError(failure)

    monkeypatch.setattr(simulation, "run_simulation", fail)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["run", str(exp)], terminal_width=200)
    assert result.exit_code == 6 and "Traceback" not in result.output
    assert f"experiment 'dp-study' stopped: {failure}" in " ".join(result.output.split())


def test_calibration_cache_is_reused_and_never_trusted_blindly(tmp_path):
    """A deployed site starts a process per message: the calibrated σ is cached in its
    workspace, and a cached σ that would overspend the target is recomputed, not used."""
    import json as _json

    from fedhealth.privacy.dp import plan as plan_mod
    from fedhealth.privacy.dp.accounting import epsilon_spent

    dp = {"mode": "record", "delta": 1e-3, "accountant": "rdp", "target_epsilon": 1.0,
          "noise_multiplier": None}  # fmt: skip
    training = {"local_epochs": 1, "batch_size": 32}
    cache = tmp_path / "dp-calibration.json"
    first = plan_mod.plan_for_site(dp, training, 5, 400, "st-olav", cache=cache)
    assert cache.is_file() and oct(cache.stat().st_mode & 0o777) == "0o600"
    plan_mod._calibrated_sigma.cache_clear()  # as in a fresh process
    again = plan_mod.plan_for_site(dp, training, 5, 400, "st-olav", cache=cache)
    assert again.noise_multiplier == first.noise_multiplier
    assert plan_mod._calibrated_sigma.cache_info().misses == 0, "the cache was not used"
    # A tampered cache (too little noise) is caught by the accountant and recomputed.
    (key,) = _json.loads(cache.read_text())
    cache.write_text(_json.dumps({key: 0.3}))
    plan_mod._calibrated_sigma.cache_clear()
    fixed = plan_mod.plan_for_site(dp, training, 5, 400, "st-olav", cache=cache)
    assert fixed.noise_multiplier == first.noise_multiplier
    steps = fixed.steps_per_round * fixed.rounds
    assert epsilon_spent(fixed.noise_multiplier, fixed.sample_rate, steps, 1e-3, "rdp") <= 1.0
