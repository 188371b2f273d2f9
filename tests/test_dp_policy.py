"""Every privacy-policy rule refuses with a message naming site, rule, cap and value."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from fedhealth.errors import PolicyError
from fedhealth.privacy.dp.policy import (
    RULES,
    PolicyViolation,
    PrivacyPolicy,
    RoundRequest,
    check_request,
)

REQ = RoundRequest(
    site="cleveland",
    dataset="heart",
    experiment="heart-disease",
    round=3,
    model="mlp",
    dp_enabled=True,
    noise_multiplier=1.1,
    delta=1e-5,
    projected_epsilon_experiment=1.2,
    spent_lifetime_other_experiments=3.1,
    he_enabled=True,
)


def _refusal(policy: PrivacyPolicy, req: RoundRequest = REQ) -> PolicyViolation:
    with pytest.raises(PolicyError) as exc:
        check_request(policy, req)
    err = exc.value
    assert isinstance(err, PolicyViolation)
    msg = str(err)
    assert f"site '{req.site}'" in msg
    assert f"round {req.round}" in msg and f"experiment '{req.experiment}'" in msg
    assert f"privacy.{err.rule}" in msg  # names the rule as the operator writes it
    assert err.site == req.site
    return err


def test_accepts_a_compliant_round():
    check_request(
        PrivacyPolicy(
            require_dp=True,
            require_he=True,
            min_noise_multiplier=1.0,
            max_epsilon_per_experiment=2.0,
            lifetime_epsilon_budget=5.0,
            max_delta=1e-4,
            allowed_experiments=["heart-*"],
            allowed_models=["mlp", "logistic_regression"],
        ),
        REQ,
    )
    check_request(PrivacyPolicy(require_dp=False), replace(REQ, dp_enabled=False))


def test_lifetime_budget_message_matches_the_spec():
    err = _refusal(PrivacyPolicy(lifetime_epsilon_budget=4.0))
    assert err.rule == "lifetime_epsilon_budget"
    assert (err.cap, err.value) == (4.0, pytest.approx(4.3))
    msg = str(err)
    assert "lifetime ε budget" in msg and "dataset 'heart'" in msg
    assert "is 4.0" in msg and "already spent 3.1" in msg and "bring it to 4.3" in msg
    assert "raise `privacy.lifetime_epsilon_budget` or plan fewer rounds / more noise" in msg


def test_max_epsilon_per_experiment():
    err = _refusal(PrivacyPolicy(max_epsilon_per_experiment=1.0))
    assert err.rule == "max_epsilon_per_experiment"
    assert "is 1.0" in str(err) and "ε=1.2" in str(err)
    assert (err.cap, err.value) == (1.0, 1.2)


def test_min_noise_multiplier():
    err = _refusal(PrivacyPolicy(min_noise_multiplier=1.5))
    assert err.rule == "min_noise_multiplier"
    assert "is 1.5" in str(err) and "uses 1.1" in str(err)


def test_max_delta():
    err = _refusal(PrivacyPolicy(max_delta=1e-6))
    assert err.rule == "max_delta"
    assert "1e-06" in str(err) and "δ=1e-05" in str(err)


def test_require_dp():
    err = _refusal(PrivacyPolicy(require_dp=True), replace(REQ, dp_enabled=False))
    assert err.rule == "require_dp"
    assert "without DP-SGD" in str(err)


def test_require_he():
    err = _refusal(PrivacyPolicy(require_he=True), replace(REQ, he_enabled=False))
    assert err.rule == "require_he"
    assert "encrypted" in str(err)


@pytest.mark.parametrize(
    "allowed,ok",
    [(["heart-disease"], True), (["heart-*"], True), (["mri-*", "x"], False), ([], False)],
)
def test_allowed_experiments_names_and_globs(allowed, ok):
    policy = PrivacyPolicy(allowed_experiments=allowed)
    if ok:
        check_request(policy, REQ)
    else:
        err = _refusal(policy)
        assert err.rule == "allowed_experiments"
        assert str(allowed) in str(err) and "'heart-disease'" in str(err)


def test_allowed_models():
    err = _refusal(PrivacyPolicy(allowed_models=["logistic_regression"]))
    assert err.rule == "allowed_models"
    assert "'mlp'" in str(err) and "logistic_regression" in str(err)
    check_request(PrivacyPolicy(allowed_models=["ml*"]), REQ)


def test_round_without_dp_breaks_any_epsilon_cap():
    no_dp = replace(REQ, dp_enabled=False)
    err = _refusal(PrivacyPolicy(require_dp=False, lifetime_epsilon_budget=100.0), no_dp)
    assert err.rule == "lifetime_epsilon_budget" and "unbounded" in str(err)
    err = _refusal(PrivacyPolicy(require_dp=False, max_epsilon_per_experiment=100.0), no_dp)
    assert err.rule == "max_epsilon_per_experiment"


def test_first_broken_rule_in_order_wins():
    strict = PrivacyPolicy(
        require_dp=True,
        require_he=True,
        min_noise_multiplier=5.0,
        max_epsilon_per_experiment=0.1,
        lifetime_epsilon_budget=0.1,
        max_delta=1e-9,
        allowed_experiments=["other"],
        allowed_models=["other"],
    )
    relaxed = {
        "allowed_experiments": None,
        "allowed_models": None,
        "require_dp": False,
        "require_he": False,
        "min_noise_multiplier": 0.0,
        "max_delta": None,
        "max_epsilon_per_experiment": None,
        "lifetime_epsilon_budget": None,
    }
    assert set(relaxed) == set(RULES)
    req = replace(REQ, he_enabled=False)  # DP on, HE off: breaks all but require_dp
    seen, policy = [], strict
    for _ in range(len(RULES) - 1):
        err = _refusal(policy, req)
        seen.append(err.rule)
        policy = replace(policy, **{err.rule: relaxed[err.rule]})
    check_request(policy, req)
    assert seen == [r for r in RULES if r != "require_dp"]
    no_dp = replace(req, dp_enabled=False)
    assert _refusal(replace(strict, allowed_experiments=None, allowed_models=None), no_dp).rule == (
        "require_dp"
    )


def test_from_mapping_accepts_dicts_and_objects():
    d = {"require_dp": True, "lifetime_epsilon_budget": 4.0, "unrelated": 1}
    assert PrivacyPolicy.from_mapping(d).lifetime_epsilon_budget == 4.0
    ns = SimpleNamespace(require_dp=False, max_delta=1e-6)
    policy = PrivacyPolicy.from_mapping(ns)
    assert policy.require_dp is False and policy.max_delta == 1e-6
